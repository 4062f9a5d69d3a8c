//! Errors: the request-path error of the gRPC API, and start-up errors.

use std::collections::HashMap;

use switchboard_status::{ErrorCode, ServiceError};

/// The gRPC domain of ledger errors.
pub const DOMAIN: &str = "ledger";

/// Request-path errors of the ledger API.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A request field is missing or invalid.
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// Several request fields are invalid: (field path, description) each.
    #[error("invalid request: {}", describe(.0))]
    InvalidFields(Vec<(String, String)>),
    /// No row for the request id.
    #[error("no usage record for request {request_id}")]
    NotFound { request_id: String },
    /// Postgres is unreachable.
    #[error("the ledger database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else (logged by `to_status`, not returned).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for LedgerError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => {
                tracing::warn!(%error, "database unavailable");
                LedgerError::Unavailable(error)
            }
            other => LedgerError::Internal(other.to_string()),
        }
    }
}

impl ServiceError for LedgerError {
    fn code(&self) -> ErrorCode {
        match self {
            LedgerError::InvalidArgument { .. } | LedgerError::InvalidFields(_) => {
                ErrorCode::InvalidArgument
            }
            LedgerError::NotFound { .. } => ErrorCode::NotFound,
            LedgerError::Unavailable(_) => ErrorCode::Unavailable,
            LedgerError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            LedgerError::InvalidArgument { field, .. } => {
                HashMap::from([("field".to_owned(), (*field).to_owned())])
            }
            LedgerError::InvalidFields(violations) => violations
                .first()
                .map(|(field, _)| HashMap::from([("field".to_owned(), field.clone())]))
                .unwrap_or_default(),
            LedgerError::NotFound { request_id } => {
                HashMap::from([("request_id".to_owned(), request_id.clone())])
            }
            _ => HashMap::new(),
        }
    }

    fn field_violations(&self) -> Vec<(String, String)> {
        match self {
            LedgerError::InvalidArgument { field, message } => {
                vec![((*field).to_owned(), message.clone())]
            }
            LedgerError::InvalidFields(violations) => violations.clone(),
            _ => Vec::new(),
        }
    }
}

fn describe(violations: &[(String, String)]) -> String {
    violations
        .iter()
        .map(|(field, message)| format!("`{field}`: {message}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why the ledger could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] switchboard_config::ConfigError),
    /// Database creation, connection or migration failed.
    #[error(transparent)]
    Database(crate::repo::RepoError),
    /// A configured price contradicts the recorded price history (a configuration error).
    #[error("invalid configuration at `ledger.prices`: {0}")]
    PriceHistory(crate::repo::RepoError),
    /// The budgets declared in `[[ledger.budgets]]` could not be applied (the database failed, or
    /// a stored budget with a declared id has another scope: a configuration error).
    #[error("cannot apply the budgets of `ledger.budgets`: {0}")]
    Budgets(#[source] crate::budget::BudgetError),
    /// NATS connection or stream set-up failed.
    #[error(transparent)]
    Bus(#[from] switchboard_bus::BusError),
    /// The JetStream consumer could not be created.
    #[error("cannot create JetStream consumer {consumer} on stream {stream}: {message}")]
    Consumer {
        consumer: String,
        stream: String,
        message: String,
    },
    /// gRPC bind or serve failed.
    #[error(transparent)]
    Grpc(#[from] switchboard_grpc::GrpcError),
    /// The `/metrics` listener could not be bound.
    #[error(transparent)]
    MetricsBind(#[from] switchboard_grpc::MetricsBindError),
    /// The listener's address is unknown.
    #[error("cannot read the gRPC listener address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

impl StartupError {
    /// Whether the error is the operator's configuration (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartupError::Config(_)
                | StartupError::PriceHistory(_)
                | StartupError::Budgets(crate::budget::BudgetError::InvalidArgument { .. })
        )
    }
}

impl From<crate::repo::RepoError> for StartupError {
    fn from(error: crate::repo::RepoError) -> Self {
        match error {
            e @ crate::repo::RepoError::PriceHistory { .. } => StartupError::PriceHistory(e),
            e => StartupError::Database(e),
        }
    }
}

/// Why the configured prices and declared budgets could not be applied, at start or on a
/// configuration reload. They are applied in one transaction: on error nothing of them is written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A configured price contradicts the recorded price history (a configuration error).
    #[error("invalid configuration at `ledger.prices`: {0}")]
    PriceHistory(#[source] crate::repo::RepoError),
    /// The declared budgets could not be applied (a stored budget with a declared id has another
    /// scope: a configuration error).
    #[error("cannot apply the budgets of `ledger.budgets`: {0}")]
    Budgets(#[source] crate::budget::BudgetError),
    /// The database failed.
    #[error(transparent)]
    Database(crate::repo::RepoError),
}

impl From<crate::repo::RepoError> for ApplyError {
    fn from(error: crate::repo::RepoError) -> Self {
        match error {
            e @ crate::repo::RepoError::PriceHistory { .. } => ApplyError::PriceHistory(e),
            e => ApplyError::Database(e),
        }
    }
}

impl From<ApplyError> for StartupError {
    fn from(error: ApplyError) -> Self {
        match error {
            ApplyError::PriceHistory(e) => StartupError::PriceHistory(e),
            ApplyError::Budgets(e) => StartupError::Budgets(e),
            ApplyError::Database(e) => StartupError::Database(e),
        }
    }
}

/// Why a configuration reload was refused: the running configuration (prices, budgets and
/// everything else) stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or `[ledger]` is invalid.
    #[error(transparent)]
    Config(#[from] switchboard_config::ConfigError),
    /// The prices or budgets could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl ReloadError {
    /// The configuration field at fault, by dotted path, when the error names one.
    pub fn field(&self) -> Option<&str> {
        use switchboard_config::ConfigError;
        match self {
            ReloadError::Config(ConfigError::Field { path, .. })
            | ReloadError::Config(ConfigError::Invalid { path, .. }) => Some(path.as_str()),
            ReloadError::Config(_) | ReloadError::Apply(ApplyError::Database(_)) => None,
            ReloadError::Apply(ApplyError::PriceHistory(_)) => Some("ledger.prices"),
            ReloadError::Apply(ApplyError::Budgets(_)) => Some("ledger.budgets"),
        }
    }
}
