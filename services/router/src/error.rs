//! The router's request-path error.

use std::collections::HashMap;

use switchboard_status::{ErrorCode, ServiceError};

/// Everything a Route/RouteStream call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request cannot be sent to any provider.
    #[error("invalid request: `{field}` {message}")]
    InvalidArgument { field: String, message: String },
    /// No route with that name.
    #[error("model `{model}` not found")]
    NotFound { model: String },
    /// A provider rejected the request as invalid; no other target is tried.
    #[error("provider rejected the request ({target}, HTTP {http_status}): {message}")]
    UpstreamRejected {
        target: String,
        key_alias: String,
        http_status: u16,
        message: String,
    },
    /// The prompt is too long for every target that could be tried: each one sent said context
    /// length exceeded, the others were skipped as unable to take the request (a window already
    /// found too small, tools, images). The request's fault, not an outage.
    #[error(
        "the prompt is longer than the context window of every target of route `{route}` ({summary}): {}",
        last.message
    )]
    ContextLengthExceeded {
        route: String,
        attempts: usize,
        summary: String,
        /// The last target that said so.
        last: Box<Rejection>,
    },
    /// Every target failed.
    #[error("all {attempts} attempts for route `{route}` failed: {summary}")]
    UpstreamUnavailable {
        route: String,
        attempts: usize,
        summary: String,
        last_error: String,
    },
    /// No target of the route can take this request (context window, tools, images).
    #[error("no target of route `{route}` can take this request: {summary}")]
    NoCapableTarget {
        route: String,
        attempts: usize,
        summary: String,
    },
    /// Every key of every target is at its RPM/TPM limit or cooling down; nothing was sent.
    #[error("every key of route `{route}` is at its rate limit: {summary}")]
    KeysExhausted {
        route: String,
        attempts: usize,
        summary: String,
    },
    /// Every target that was tried answered 429 (the others were passed over: keys at their
    /// limits, capability, budget): the caller should slow down, not treat it as an outage.
    #[error(
        "every target of route `{route}` that was tried is rate limited by its provider: {summary}"
    )]
    ProviderRateLimited {
        route: String,
        attempts: usize,
        summary: String,
        /// The last provider's `Retry-After`, rounded up to whole seconds.
        retry_after_secs: Option<u64>,
    },
    /// The request's spend allowance (a budget, ADR 007) fits no remaining target's estimate;
    /// those targets were not sent.
    #[error(
        "budget exceeded: no target of route `{route}` fits the request's spend allowance: {summary}"
    )]
    BudgetExceeded {
        route: String,
        attempts: usize,
        summary: String,
    },
    /// The caller's deadline passed.
    #[error("deadline exceeded after {attempts} attempts for route `{route}`")]
    DeadlineExceeded {
        route: String,
        attempts: usize,
        last_error: String,
    },
    /// A stream failed after chunks were forwarded. `from` names the deployment that was
    /// streaming, so that the caller can bill what it consumed.
    #[error("stream interrupted after {chunks} chunks")]
    StreamInterrupted {
        route: String,
        chunks: usize,
        from: Box<StreamSource>,
        last_error: String,
    },
}

/// A request no attempt served: why, and what its attempts consumed as their providers reported
/// it, when any did (an Anthropic stream's `message_start` before the failure that ended it), so
/// that the caller bills it: every attempt, the last one's deployment named as the route's. Sent
/// to the caller in the status's `switchboard_status::serving::CONSUMED` metadata.
#[derive(Debug)]
pub struct Unserved {
    /// Why.
    pub error: RouterError,
    /// The attempts, when one reported usage.
    pub consumed: Option<Box<switchboard_proto::chat::v1::RouteInfo>>,
}

impl From<RouterError> for Unserved {
    fn from(error: RouterError) -> Self {
        Unserved {
            error,
            consumed: None,
        }
    }
}

/// A provider's rejection of a request: which deployment, its HTTP status and its message.
#[derive(Debug, Default)]
pub struct Rejection {
    /// `provider/model`.
    pub target: String,
    /// Alias of the configured key, empty for the provider's own key.
    pub key_alias: String,
    /// The provider's HTTP status.
    pub http_status: u16,
    /// The provider's message (never prompt text of ours).
    pub message: String,
}

/// The deployment a broken stream was reading from (all empty when none had started).
#[derive(Debug, Default)]
pub struct StreamSource {
    /// `provider/model`.
    pub target: String,
    /// Provider name.
    pub provider: String,
    /// Provider model.
    pub model: String,
    /// Alias of the configured key, empty for the provider's own key.
    pub key_alias: String,
    /// Attempts made, the broken one included.
    pub attempts: usize,
}

impl ServiceError for RouterError {
    fn code(&self) -> ErrorCode {
        match self {
            RouterError::InvalidArgument { .. } | RouterError::NoCapableTarget { .. } => {
                ErrorCode::InvalidArgument
            }
            RouterError::NotFound { .. } => ErrorCode::NotFound,
            RouterError::UpstreamRejected { .. } | RouterError::ContextLengthExceeded { .. } => {
                ErrorCode::UpstreamRejected
            }
            RouterError::UpstreamUnavailable { .. } | RouterError::StreamInterrupted { .. } => {
                ErrorCode::UpstreamUnavailable
            }
            RouterError::DeadlineExceeded { .. } => ErrorCode::Timeout,
            RouterError::KeysExhausted { .. }
            | RouterError::BudgetExceeded { .. }
            | RouterError::ProviderRateLimited { .. } => ErrorCode::RateLimited,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let pairs: Vec<(&str, String)> = match self {
            RouterError::InvalidArgument { field, .. } => vec![("field", field.clone())],
            RouterError::NotFound { model } => vec![("model", model.clone())],
            RouterError::UpstreamRejected {
                target,
                key_alias,
                http_status,
                ..
            } => {
                let mut pairs = vec![
                    ("target", target.clone()),
                    ("http_status", http_status.to_string()),
                ];
                if !key_alias.is_empty() {
                    pairs.push(("key_alias", key_alias.clone()));
                }
                pairs
            }
            RouterError::ContextLengthExceeded {
                route,
                attempts,
                last,
                ..
            } => {
                let mut pairs = vec![
                    ("route", route.clone()),
                    ("attempts", attempts.to_string()),
                    (
                        "cause",
                        switchboard_status::CONTEXT_LENGTH_EXCEEDED.to_owned(),
                    ),
                    ("target", last.target.clone()),
                    ("http_status", last.http_status.to_string()),
                ];
                if !last.key_alias.is_empty() {
                    pairs.push(("key_alias", last.key_alias.clone()));
                }
                pairs
            }
            RouterError::UpstreamUnavailable {
                route,
                attempts,
                last_error,
                ..
            } => vec![
                ("route", route.clone()),
                ("attempts", attempts.to_string()),
                ("last_error", last_error.clone()),
            ],
            RouterError::NoCapableTarget {
                route, attempts, ..
            }
            | RouterError::KeysExhausted {
                route, attempts, ..
            } => vec![("route", route.clone()), ("attempts", attempts.to_string())],
            RouterError::ProviderRateLimited {
                route,
                attempts,
                retry_after_secs,
                ..
            } => {
                let mut pairs = vec![("route", route.clone()), ("attempts", attempts.to_string())];
                if let Some(secs) = retry_after_secs {
                    pairs.push(("retry_after_secs", secs.to_string()));
                }
                pairs
            }
            RouterError::BudgetExceeded {
                route, attempts, ..
            } => vec![
                ("route", route.clone()),
                ("attempts", attempts.to_string()),
                ("budget", "exceeded".to_owned()),
            ],
            RouterError::DeadlineExceeded {
                route,
                attempts,
                last_error,
            } => vec![
                ("route", route.clone()),
                ("attempts", attempts.to_string()),
                ("last_error", last_error.clone()),
            ],
            RouterError::StreamInterrupted {
                route,
                chunks,
                from,
                last_error,
            } => {
                let mut pairs = vec![
                    ("route", route.clone()),
                    ("chunks", chunks.to_string()),
                    ("target", from.target.clone()),
                    ("last_error", last_error.clone()),
                ];
                if from.attempts > 0 {
                    pairs.push(("attempts", from.attempts.to_string()));
                }
                for (name, value) in [
                    ("provider", &from.provider),
                    ("model", &from.model),
                    ("key_alias", &from.key_alias),
                ] {
                    if !value.is_empty() {
                        pairs.push((name, value.clone()));
                    }
                }
                pairs
            }
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}
