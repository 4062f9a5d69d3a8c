//! The request-path error and the startup error.

use std::collections::HashMap;

use switchboard_status::{ErrorCode, ServiceError};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// A content part of a kind the guard cannot inspect (for example one added by a newer API version).
    #[error("messages[{message}].content[{part}] is of a kind the guard cannot inspect")]
    UninspectableContent { message: usize, part: usize },
    /// Too many checks are already waiting (see [`crate::admission`]).
    #[error("the guard is overloaded ({in_flight} checks in flight); retry later")]
    Overloaded { in_flight: usize },
    /// The call waited longer than `[guard.admission] max_wait_ms` for its turn.
    #[error("the guard is overloaded (the check waited {waited_ms} ms for its turn); retry later")]
    WaitedTooLong { waited_ms: u64 },
}

impl ServiceError for GuardError {
    fn code(&self) -> ErrorCode {
        match self {
            GuardError::UninspectableContent { .. } => ErrorCode::InvalidArgument,
            GuardError::Overloaded { .. } | GuardError::WaitedTooLong { .. } => {
                ErrorCode::Unavailable
            }
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            GuardError::UninspectableContent { message, part } => HashMap::from([(
                "field".to_owned(),
                format!("messages[{message}].content[{part}]"),
            )]),
            GuardError::Overloaded { .. } | GuardError::WaitedTooLong { .. } => HashMap::from([(
                "reason".to_owned(),
                switchboard_status::GUARD_OVERLOADED.to_owned(),
            )]),
        }
    }
}

/// Why the guard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] switchboard_config::ConfigError),
    /// A recogniser's pattern or word list does not compile (a bug).
    #[error(transparent)]
    Recognizer(#[from] crate::recognizer::BuildError),
    /// The prompt-injection detector cannot be built (a bug in the shipped patterns or weights).
    #[error("cannot build the injection detector: {0}")]
    Injection(#[from] crate::injection::DetectorError),
    /// The gRPC server could not bind or failed.
    #[error(transparent)]
    Grpc(#[from] switchboard_grpc::GrpcError),
    /// The `/metrics` address cannot be bound.
    #[error(transparent)]
    MetricsBind(#[from] switchboard_grpc::MetricsBindError),
    /// NATS (the audit trail) cannot be set up.
    #[error(transparent)]
    Bus(#[from] switchboard_bus::BusError),
    /// The listener's address is unavailable.
    #[error("cannot read the listener address: {0}")]
    Io(#[from] std::io::Error),
}
