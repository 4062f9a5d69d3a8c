//! Generated protobuf messages and tonic clients/servers for the Switchboard API (`proto/`).
//!
//! One module per versioned package, e.g. [`chat::v1`] and [`router::v1`].
#![allow(clippy::all, missing_docs)]

/// The provider-neutral chat model.
pub mod chat {
    pub mod v1 {
        tonic::include_proto!("switchboard.chat.v1");
    }
}
/// The gateway API.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("switchboard.gateway.v1");
    }
}
/// The router API.
pub mod router {
    pub mod v1 {
        tonic::include_proto!("switchboard.router.v1");
    }
}
/// The cache API.
pub mod cache {
    pub mod v1 {
        tonic::include_proto!("switchboard.cache.v1");
    }
}
/// The guard API.
pub mod guard {
    pub mod v1 {
        tonic::include_proto!("switchboard.guard.v1");
    }
}
/// The ledger API and the usage event.
pub mod ledger {
    pub mod v1 {
        tonic::include_proto!("switchboard.ledger.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Switchboard proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("switchboard_descriptor");

pub use prost_types::Timestamp;

/// Helpers on generated types.
mod ext;
