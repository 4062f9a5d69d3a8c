//! The request-path error and the startup error.

use std::collections::HashMap;

use switchboard_status::{ErrorCode, ServiceError};

use crate::store::StoreError;

/// Why a lookup or a store failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A required field is missing or empty.
    #[error("`{field}` is required")]
    Missing { field: &'static str },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for CacheError {
    fn code(&self) -> ErrorCode {
        match self {
            CacheError::Missing { .. } => ErrorCode::InvalidArgument,
            CacheError::Store(_) => ErrorCode::Unavailable,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            CacheError::Missing { field } => {
                HashMap::from([("field".to_owned(), (*field).to_owned())])
            }
            CacheError::Store(_) => HashMap::new(),
        }
    }
}

/// Why the cache could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] switchboard_config::ConfigError),
    /// The gRPC server could not bind or failed.
    #[error(transparent)]
    Grpc(#[from] switchboard_grpc::GrpcError),
    /// The `/metrics` address cannot be bound.
    #[error(transparent)]
    MetricsBind(#[from] switchboard_grpc::MetricsBindError),
    /// The listener's address is unavailable.
    #[error("cannot read the listener address: {0}")]
    Io(#[from] std::io::Error),
    /// The semantic cache is enabled but its embedding model could not be loaded.
    #[error(transparent)]
    Embed(#[from] switchboard_embed::EmbedError),
    /// The shared store (NATS JetStream) could not be set up or loaded.
    #[error(transparent)]
    Replication(#[from] crate::replication::ReplicationError),
}
