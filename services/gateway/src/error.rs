//! The gateway's request-path errors, mapped to gRPC statuses and OpenAI-style HTTP bodies in one place.

use std::collections::HashMap;

use switchboard_status::{ErrorCode, ServiceError};

use crate::openai::{ErrorBody, ErrorDetail};

/// Everything that can fail a request at the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No `Authorization: Bearer` credentials.
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    /// Credentials that match no configured key.
    #[error("invalid API key")]
    InvalidKey,
    /// The key's `expires_at` has passed.
    #[error("API key `{key_id}` expired at {expired_at}")]
    KeyExpired { key_id: String, expired_at: String },
    /// The key may not call this model (`gateway.keys[].models`).
    #[error("key `{key_id}` may not use model `{model}` (it may use: {allowed})")]
    ModelNotAllowed {
        key_id: String,
        model: String,
        allowed: String,
    },
    /// `GET /v1/models/{model}` for a model the router does not serve.
    #[error("the model `{model}` does not exist")]
    ModelNotFound { model: String },
    /// No HTTP route at this path (the query is never echoed: it may hold a key).
    #[error("no such endpoint: {method} {path}")]
    UnknownUrl { method: String, path: String },
    /// The body is not valid JSON or not a valid request.
    #[error("invalid request at `{field}`: {message}")]
    InvalidRequest { field: String, message: String },
    /// The body is larger than the configured limit (its size, when known before reading it: a
    /// chunked body or a compressed gRPC message is stopped at the limit).
    #[error(
        "request body {}exceeds the limit of {limit} bytes",
        size.map(|s| format!("of {s} bytes ")).unwrap_or_default()
    )]
    PayloadTooLarge { size: Option<usize>, limit: usize },
    /// An internal hop (guard, cache, router) refused a message of the request for its size: the
    /// request is too large for the mesh, not a dependency that is down.
    #[error(
        "request too large for the {service}{}; send a smaller request",
        limit.map(|l| format!(" (it accepts messages of up to {l} bytes)")).unwrap_or_default()
    )]
    HopPayloadTooLarge {
        service: &'static str,
        /// The hop's limit, when its refusal said.
        limit: Option<usize>,
    },
    /// The guard refused the prompt.
    #[error("request blocked by policy: prompt contains {entities}")]
    Blocked { entities: String },
    /// A downstream service answered with an error; its code and message are passed through.
    #[error("{message}")]
    Downstream {
        code: ErrorCode,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// The guard could not check the request (unreachable, too slow, or shedding load) and the
    /// request's route fails closed (`[gateway.guard]`).
    #[error("{cause} and route `{route}` fails closed")]
    GuardUnavailable { route: String, cause: GuardDown },
    /// The guard refused the provider's answer (entity types only, never values).
    #[error("answer blocked by policy: answer contains {entities}")]
    AnswerBlocked { entities: String },
    /// A required dependency (the guard, fail-closed) is unreachable.
    #[error("{service} is unavailable")]
    DependencyDown { service: &'static str },
    /// A hard budget of the caller cannot cover the request (ADR 007).
    #[error(
        "budget `{budget_id}` of {scope} is exhausted: limit {} USD{}",
        usd(*limit_usd_nanos),
        resets(resets_at)
    )]
    BudgetExceeded {
        budget_id: String,
        scope: String,
        limit_usd_nanos: i64,
        /// RFC 3339; empty for a lifetime budget.
        resets_at: String,
    },
    /// A shared per-minute rate limit of the caller's key or app is reached.
    #[error(
        "rate limit of {scope} reached ({limit} = {limit_value}); retry after {retry_after_secs} s"
    )]
    RateLimited {
        scope: String,
        /// The limit that refused: `requests_per_minute` or `tokens_per_minute`.
        limit: &'static str,
        /// Its configured value.
        limit_value: u64,
        retry_after_secs: u64,
    },
    /// The request is charged more tokens than the whole `tokens_per_minute` limit of the caller's
    /// key or app: no window will ever admit it, so it is the request's fault, not a rate limit.
    #[error(
        "the request is charged {charge} tokens (prompt bound plus max_tokens × n), more than the \
         whole tokens_per_minute limit of {scope} ({limit}): it can never be admitted; lower \
         max_tokens or shorten the input"
    )]
    TokensExceedRateLimit {
        scope: String,
        limit: u64,
        charge: u64,
    },
    /// Too many requests in flight at this gateway.
    #[error("gateway overloaded: {limit} requests in flight; retry with backoff")]
    Overloaded { limit: usize },
    /// `only-if-cached` and the cache has no answer (or was not consulted): nothing was sent to a
    /// provider.
    #[error("no cached answer for this request (only-if-cached)")]
    NotCached,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why the guard could not check a request: what a fail-closed refusal says (message and
/// `metadata.cause`), so that an SRE tells a guard that is down from one that is shedding load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDown {
    /// No connection, a reset stream, or an UNAVAILABLE the guard gave no reason for.
    Unreachable,
    /// The call's deadline passed before the guard answered.
    TimedOut,
    /// The guard refused the check to bound its queue (`GUARD_OVERLOADED`, its `[guard.admission]`).
    Overloaded,
}

impl GuardDown {
    /// Why the guard call that failed with `error` did not check anything; `None` for an error
    /// that is the guard's answer about the request itself (an invalid part, say).
    pub fn of(error: &GatewayError) -> Option<Self> {
        match error {
            GatewayError::DependencyDown { .. } => Some(GuardDown::Unreachable),
            GatewayError::Downstream {
                code: ErrorCode::Timeout,
                ..
            } => Some(GuardDown::TimedOut),
            GatewayError::Downstream {
                code: ErrorCode::Unavailable,
                metadata,
                ..
            } => Some(
                if metadata.get("reason").map(String::as_str)
                    == Some(switchboard_status::GUARD_OVERLOADED)
                {
                    GuardDown::Overloaded
                } else {
                    GuardDown::Unreachable
                },
            ),
            _ => None,
        }
    }

    /// The `metadata.cause` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardDown::Unreachable => "unreachable",
            GuardDown::TimedOut => "timeout",
            GuardDown::Overloaded => "overloaded",
        }
    }
}

impl std::fmt::Display for GuardDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuardDown::Unreachable => "guard is unavailable",
            GuardDown::TimedOut => "guard did not answer in time",
            GuardDown::Overloaded => "guard is overloaded (retry with backoff)",
        })
    }
}

/// Whether a status message without `ErrorInfo` is a gRPC stack's refusal of a message for its
/// size (tonic: "decoded message length too large"; grpc-go: "received message larger than max";
/// grpc-java: "exceeds maximum size"), not a transport failure such as an h2 ENHANCE_YOUR_CALM
/// reset (also RESOURCE_EXHAUSTED).
fn refused_for_size(message: &str) -> bool {
    [
        "message length too large",
        "larger than max",
        "exceeds maximum size",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// The limit a size refusal names (tonic: "…, the limit is: N bytes").
fn size_limit(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once("the limit is: ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Nano-USD as a decimal USD amount.
fn usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

fn resets(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(", resets at {at}")
    }
}

impl GatewayError {
    /// Seconds after which a refused request may be retried (the `Retry-After` header and gRPC
    /// `RetryInfo`), for rate limits.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            // A provider's own rate limit, passed on by the router with its Retry-After.
            GatewayError::Downstream {
                code: ErrorCode::RateLimited,
                metadata,
                ..
            } => metadata.get("retry_after_secs")?.parse().ok(),
            _ => None,
        }
    }

    /// Whether retrying the same request soon cannot succeed although its HTTP status (429, 504)
    /// makes the OpenAI and Anthropic SDKs retry it: an exhausted budget (until its reset) and an
    /// `only-if-cached` miss. Said with `x-should-retry: false`, which both SDKs obey.
    pub fn futile_to_retry(&self) -> bool {
        matches!(
            self,
            GatewayError::BudgetExceeded { .. } | GatewayError::NotCached
        )
    }

    /// The router's refusal of a prompt too long for every target that could take it
    /// (`UPSTREAM_REJECTED`, `cause = context_length_exceeded`).
    fn context_length_exceeded(&self) -> bool {
        matches!(
            self,
            GatewayError::Downstream {
                code: ErrorCode::UpstreamRejected,
                metadata,
                ..
            } if metadata.get("cause").map(String::as_str)
                == Some(switchboard_status::CONTEXT_LENGTH_EXCEEDED)
        )
    }

    /// Wraps a downstream status, keeping its code and `ErrorInfo` metadata.
    pub fn from_status(service: &'static str, status: &tonic::Status) -> Self {
        use tonic_types::StatusExt;
        // Our services always attach an ErrorInfo. A status without one comes from the transport
        // (connection refused, h2 stream reset, overload), so it says nothing about the request:
        // the dependency is unavailable, whatever gRPC code the transport chose.
        // The one exception is a message refused for its size by the hop's gRPC codec (tonic's
        // OUT_OF_RANGE "decoded message length too large", or another stack's RESOURCE_EXHAUSTED):
        // the request is too large, and the hop is up.
        if status.get_details_error_info().is_none() {
            return match status.code() {
                tonic::Code::DeadlineExceeded => GatewayError::Downstream {
                    code: ErrorCode::Timeout,
                    message: format!("{service} did not answer in time"),
                    metadata: HashMap::new(),
                },
                tonic::Code::OutOfRange => GatewayError::HopPayloadTooLarge {
                    service,
                    limit: size_limit(status.message()),
                },
                tonic::Code::ResourceExhausted if refused_for_size(status.message()) => {
                    GatewayError::HopPayloadTooLarge {
                        service,
                        limit: size_limit(status.message()),
                    }
                }
                _ => GatewayError::DependencyDown { service },
            };
        }
        GatewayError::Downstream {
            code: ErrorCode::from_status(status),
            message: status.message().to_owned(),
            metadata: switchboard_status::status_metadata(status),
        }
    }

    /// The OpenAI-style body for this error.
    pub fn body(&self) -> ErrorBody {
        crate::metrics::refused(crate::metrics::Face::OpenAi, self);
        let code = self.code();
        let message = if code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        let (kind, code_name) = match self {
            GatewayError::BudgetExceeded { .. } => ("insufficient_quota", "budget_exceeded"),
            GatewayError::RateLimited { .. } => ("rate_limit_error", "rate_limit_exceeded"),
            GatewayError::GuardUnavailable { .. } => (code.openai_type(), "guard_unavailable"),
            GatewayError::ModelNotAllowed { .. } => (code.openai_type(), "model_not_allowed"),
            GatewayError::KeyExpired { .. } => (code.openai_type(), "key_expired"),
            GatewayError::ModelNotFound { .. } => (code.openai_type(), "model_not_found"),
            GatewayError::UnknownUrl { .. } => (code.openai_type(), "unknown_url"),
            GatewayError::TokensExceedRateLimit { .. } => {
                (code.openai_type(), "tokens_exceed_rate_limit")
            }
            // OpenAI's own code, which SDKs and agents look for to trim the conversation.
            GatewayError::Downstream { .. } if self.context_length_exceeded() => {
                (code.openai_type(), "context_length_exceeded")
            }
            _ => (code.openai_type(), code.as_str()),
        };
        let param = match self {
            GatewayError::InvalidRequest { field, .. } => Some(field.clone()),
            GatewayError::ModelNotAllowed { .. } | GatewayError::ModelNotFound { .. } => {
                Some("model".to_owned())
            }
            GatewayError::TokensExceedRateLimit { .. } => Some("max_tokens".to_owned()),
            GatewayError::Downstream { .. } if self.context_length_exceeded() => {
                Some("messages".to_owned())
            }
            GatewayError::Downstream { metadata, .. } => {
                metadata.get("field").or(metadata.get("model")).cloned()
            }
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind,
                param,
                code: code_name,
            },
        }
    }
}

impl GatewayError {
    /// Anthropic's error `type` for this error (its HTTP status is the code's, as for every API).
    pub fn anthropic_type(&self) -> &'static str {
        match self.code() {
            ErrorCode::InvalidArgument | ErrorCode::UpstreamRejected => "invalid_request_error",
            ErrorCode::PayloadTooLarge => "request_too_large",
            ErrorCode::Unauthenticated => "authentication_error",
            ErrorCode::PermissionDenied => "permission_error",
            ErrorCode::NotFound | ErrorCode::NotCached => "not_found_error",
            ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::Unavailable => "overloaded_error",
            ErrorCode::UpstreamUnavailable | ErrorCode::Timeout | ErrorCode::Internal => {
                "api_error"
            }
        }
    }

    /// Anthropic's error body: `{"type":"error","error":{"type","message"}}`.
    pub fn anthropic_body(&self) -> crate::anthropic::ErrorBody {
        crate::metrics::refused(crate::metrics::Face::Anthropic, self);
        let message = if self.code() == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        crate::anthropic::ErrorBody {
            kind: "error",
            error: crate::anthropic::ErrorDetail {
                kind: self.anthropic_type(),
                message,
            },
        }
    }
}

impl ServiceError for GatewayError {
    fn code(&self) -> ErrorCode {
        match self {
            GatewayError::MissingKey
            | GatewayError::InvalidKey
            | GatewayError::KeyExpired { .. } => ErrorCode::Unauthenticated,
            GatewayError::InvalidRequest { .. } | GatewayError::TokensExceedRateLimit { .. } => {
                ErrorCode::InvalidArgument
            }
            GatewayError::ModelNotFound { .. } | GatewayError::UnknownUrl { .. } => {
                ErrorCode::NotFound
            }
            GatewayError::PayloadTooLarge { .. } | GatewayError::HopPayloadTooLarge { .. } => {
                ErrorCode::PayloadTooLarge
            }
            GatewayError::Blocked { .. }
            | GatewayError::AnswerBlocked { .. }
            | GatewayError::ModelNotAllowed { .. } => ErrorCode::PermissionDenied,
            GatewayError::GuardUnavailable { .. } => ErrorCode::Unavailable,
            GatewayError::Downstream { code, .. } => *code,
            GatewayError::DependencyDown { .. } | GatewayError::Overloaded { .. } => {
                ErrorCode::Unavailable
            }
            GatewayError::BudgetExceeded { .. } | GatewayError::RateLimited { .. } => {
                ErrorCode::RateLimited
            }
            GatewayError::NotCached => ErrorCode::NotCached,
            GatewayError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            GatewayError::InvalidRequest { field, .. } => {
                HashMap::from([("field".to_owned(), field.clone())])
            }
            GatewayError::Blocked { entities } => {
                HashMap::from([("entities".to_owned(), entities.clone())])
            }
            GatewayError::KeyExpired { key_id, expired_at } => HashMap::from([
                ("reason".to_owned(), "key_expired".to_owned()),
                ("key_id".to_owned(), key_id.clone()),
                ("expired_at".to_owned(), expired_at.clone()),
            ]),
            GatewayError::ModelNotAllowed { key_id, model, .. } => HashMap::from([
                ("reason".to_owned(), "model_not_allowed".to_owned()),
                ("key_id".to_owned(), key_id.clone()),
                ("model".to_owned(), model.clone()),
            ]),
            GatewayError::ModelNotFound { model } => HashMap::from([
                ("reason".to_owned(), "model_not_found".to_owned()),
                ("model".to_owned(), model.clone()),
            ]),
            GatewayError::UnknownUrl { method, path } => HashMap::from([
                ("method".to_owned(), method.clone()),
                ("path".to_owned(), path.clone()),
            ]),
            GatewayError::PayloadTooLarge { limit, .. } => {
                HashMap::from([("limit".to_owned(), limit.to_string())])
            }
            GatewayError::HopPayloadTooLarge { service, limit } => {
                let mut metadata = HashMap::from([("service".to_owned(), (*service).to_owned())]);
                if let Some(limit) = limit {
                    metadata.insert("limit".to_owned(), limit.to_string());
                }
                metadata
            }
            GatewayError::Downstream { metadata, .. } => metadata.clone(),
            GatewayError::DependencyDown { service } => {
                HashMap::from([("service".to_owned(), (*service).to_owned())])
            }
            GatewayError::GuardUnavailable { route, cause } => HashMap::from([
                ("service".to_owned(), "guard".to_owned()),
                ("reason".to_owned(), "guard_unavailable".to_owned()),
                ("route".to_owned(), route.clone()),
                ("cause".to_owned(), cause.as_str().to_owned()),
            ]),
            GatewayError::AnswerBlocked { entities } => HashMap::from([
                ("entities".to_owned(), entities.clone()),
                ("direction".to_owned(), "answer".to_owned()),
            ]),
            GatewayError::BudgetExceeded {
                budget_id,
                scope,
                limit_usd_nanos,
                resets_at,
            } => HashMap::from([
                ("budget".to_owned(), "exceeded".to_owned()),
                ("budget_id".to_owned(), budget_id.clone()),
                ("scope".to_owned(), scope.clone()),
                ("limit_usd_nanos".to_owned(), limit_usd_nanos.to_string()),
                ("resets_at".to_owned(), resets_at.clone()),
            ]),
            GatewayError::RateLimited {
                scope,
                limit,
                limit_value,
                retry_after_secs,
            } => HashMap::from([
                ("scope".to_owned(), scope.clone()),
                ("limit".to_owned(), (*limit).to_owned()),
                ("limit_value".to_owned(), limit_value.to_string()),
                ("retry_after_secs".to_owned(), retry_after_secs.to_string()),
            ]),
            GatewayError::TokensExceedRateLimit {
                scope,
                limit,
                charge,
            } => HashMap::from([
                ("reason".to_owned(), "tokens_exceed_rate_limit".to_owned()),
                ("field".to_owned(), "max_tokens".to_owned()),
                ("scope".to_owned(), scope.clone()),
                ("limit".to_owned(), "tokens_per_minute".to_owned()),
                ("limit_value".to_owned(), limit.to_string()),
                ("charge".to_owned(), charge.to_string()),
            ]),
            _ => HashMap::new(),
        }
    }

    /// The invalid field of an `INVALID_ARGUMENT`, as a `google.rpc.BadRequest` violation next to
    /// `ErrorInfo` (whose `metadata.field` names it too): the gateway's own validation, a request
    /// charged more than a whole token limit (`max_tokens`), and a hop's refusal naming a field.
    fn field_violations(&self) -> Vec<(String, String)> {
        match self {
            GatewayError::InvalidRequest { field, message } => {
                vec![(field.clone(), message.clone())]
            }
            GatewayError::TokensExceedRateLimit { .. } => {
                vec![("max_tokens".to_owned(), self.to_string())]
            }
            GatewayError::Downstream {
                code: ErrorCode::InvalidArgument,
                message,
                metadata,
            } => metadata
                .get("field")
                .map(|field| vec![(field.clone(), message.clone())])
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        crate::metrics::refused(crate::metrics::Face::Grpc, &error);
        if let Some(secs) = error.retry_after_secs() {
            // RESOURCE_EXHAUSTED with ErrorInfo and RetryInfo.
            let mut details = tonic_types::ErrorDetails::with_error_info(
                error.code().as_str(),
                "gateway",
                error.metadata(),
            );
            details.set_retry_info(Some(std::time::Duration::from_secs(secs)));
            use tonic_types::StatusExt;
            return tonic::Status::with_error_details(
                error.code().grpc(),
                error.to_string(),
                details,
            );
        }
        switchboard_status::to_status("gateway", &error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_unavailable_not_rate_limits() {
        let reset = tonic::Status::resource_exhausted("h2 protocol error: stream reset");
        let error = GatewayError::from_status("router", &reset);
        assert_eq!(error.code(), ErrorCode::Unavailable);
        assert_eq!(
            error.code().http_status(),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn a_prompt_too_long_for_every_target_gets_openais_context_length_code() {
        let error = GatewayError::Downstream {
            code: ErrorCode::UpstreamRejected,
            message: "prompt too long".into(),
            metadata: HashMap::from([("cause".to_owned(), "context_length_exceeded".to_owned())]),
        };
        assert_eq!(error.code().http_status(), http::StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(error.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert_eq!(body["error"]["param"], "messages");
        // Another rejection keeps the generic code.
        let other = GatewayError::Downstream {
            code: ErrorCode::UpstreamRejected,
            message: "bad parameter".into(),
            metadata: HashMap::new(),
        };
        let body = serde_json::to_value(other.body()).unwrap();
        assert_eq!(body["error"]["code"], "UPSTREAM_REJECTED");
    }

    #[test]
    fn a_providers_rate_limit_passed_on_by_the_router_keeps_its_retry_after() {
        use tonic_types::StatusExt;
        let router = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "every target of route `chat` that was tried is rate limited by its provider",
            tonic_types::ErrorDetails::with_error_info(
                "RATE_LIMITED",
                "router",
                HashMap::from([
                    ("route".to_owned(), "chat".to_owned()),
                    ("retry_after_secs".to_owned(), "12".to_owned()),
                ]),
            ),
        );
        let error = GatewayError::from_status("router", &router);
        assert_eq!(error.retry_after_secs(), Some(12));
        assert_eq!(
            error.code().http_status(),
            http::StatusCode::TOO_MANY_REQUESTS
        );
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(std::time::Duration::from_secs(12))
        );
        // Without one from the provider, no Retry-After is made up.
        let bare = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "rate limited",
            tonic_types::ErrorDetails::with_error_info("RATE_LIMITED", "router", HashMap::new()),
        );
        assert_eq!(
            GatewayError::from_status("router", &bare).retry_after_secs(),
            None
        );
    }

    #[test]
    fn budget_errors_name_the_scope_limit_and_reset_and_rate_limits_carry_retry_info() {
        let error = GatewayError::BudgetExceeded {
            budget_id: "b1".into(),
            scope: "app:a".into(),
            limit_usd_nanos: 1_500_000,
            resets_at: "2026-11-27T00:00:00Z".into(),
        };
        assert_eq!(
            error.code().http_status(),
            http::StatusCode::TOO_MANY_REQUESTS
        );
        let body = serde_json::to_value(error.body()).unwrap();
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "budget_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("app:a"), "{message}");
        assert!(message.contains("0.001500000 USD"), "{message}");
        assert!(message.contains("2026-11-27T00:00:00Z"), "{message}");

        let limited = GatewayError::RateLimited {
            scope: "key:k".into(),
            limit: "tokens_per_minute",
            limit_value: 5_000,
            retry_after_secs: 7,
        };
        let body = serde_json::to_value(limited.body()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("key:k"), "{message}");
        assert!(message.contains("tokens_per_minute = 5000"), "{message}");
        let status = tonic::Status::from(limited);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        use tonic_types::StatusExt;
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(std::time::Duration::from_secs(7))
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.metadata["limit"], "tokens_per_minute");
        assert_eq!(info.metadata["limit_value"], "5000");
        assert_eq!(info.metadata["scope"], "key:k");
    }

    #[test]
    fn a_request_larger_than_a_whole_token_limit_is_invalid_not_rate_limited() {
        let error = GatewayError::TokensExceedRateLimit {
            scope: "app:a".into(),
            limit: 1_000,
            charge: 4_104,
        };
        assert_eq!(error.code().http_status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(error.retry_after_secs(), None);
        let body = serde_json::to_value(error.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "tokens_exceed_rate_limit");
        assert_eq!(body["error"]["param"], "max_tokens");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("4104 tokens"), "{message}");
        assert!(
            message.contains("tokens_per_minute limit of app:a (1000)"),
            "{message}"
        );
        assert_eq!(error.anthropic_type(), "invalid_request_error");
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.metadata["limit"], "tokens_per_minute");
        assert_eq!(info.metadata["limit_value"], "1000");
        assert_eq!(info.metadata["charge"], "4104");
    }

    #[test]
    fn a_fail_closed_refusal_says_whether_the_guard_was_down_slow_or_shedding_load() {
        let overloaded = switchboard_status::status(
            ErrorCode::Unavailable,
            "guard",
            "the guard is overloaded (992 checks in flight); retry later",
            HashMap::from([(
                "reason".to_owned(),
                switchboard_status::GUARD_OVERLOADED.to_owned(),
            )]),
        );
        let cases = [
            (overloaded, "overloaded", "guard is overloaded"),
            (
                tonic::Status::unavailable("connection refused"),
                "unreachable",
                "guard is unavailable",
            ),
            (
                tonic::Status::deadline_exceeded("deadline"),
                "timeout",
                "guard did not answer in time",
            ),
            (
                switchboard_status::status(
                    ErrorCode::Unavailable,
                    "guard",
                    "shutting down",
                    HashMap::new(),
                ),
                "unreachable",
                "guard is unavailable",
            ),
        ];
        for (status, cause, says) in cases {
            let down = GuardDown::of(&GatewayError::from_status("guard", &status))
                .unwrap_or_else(|| panic!("{status:?} is a guard that did not check"));
            assert_eq!(down.as_str(), cause);
            let error = GatewayError::GuardUnavailable {
                route: "gpt-4o-mini".into(),
                cause: down,
            };
            assert_eq!(
                error.code().http_status(),
                http::StatusCode::SERVICE_UNAVAILABLE
            );
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["error"]["code"], "guard_unavailable");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.starts_with(says), "{message}");
            assert!(message.contains("`gpt-4o-mini` fails closed"), "{message}");
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            use tonic_types::StatusExt;
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.metadata["cause"], cause);
            assert_eq!(info.metadata["route"], "gpt-4o-mini");
        }
        // The guard's verdict on the request itself is not a guard that is down.
        let invalid = switchboard_status::status(
            ErrorCode::InvalidArgument,
            "guard",
            "messages[0].content[1] is of a kind the guard cannot inspect",
            HashMap::new(),
        );
        assert_eq!(
            GuardDown::of(&GatewayError::from_status("guard", &invalid)),
            None
        );
    }

    #[test]
    fn a_hop_that_refuses_a_message_for_its_size_is_payload_too_large_not_down() {
        let refused = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242960 bytes, the limit is: 4194304 bytes",
        );
        for service in ["guard", "cache", "router"] {
            let error = GatewayError::from_status(service, &refused);
            assert_eq!(error.code(), ErrorCode::PayloadTooLarge, "{service}");
            assert_eq!(
                error.code().http_status(),
                http::StatusCode::PAYLOAD_TOO_LARGE
            );
            assert_eq!(error.metadata()["service"], service);
            assert_eq!(error.metadata()["limit"], "4194304");
            assert_eq!(error.anthropic_type(), "request_too_large");
            // Not a guard that did not check: neither a fail-closed 503 nor a fail-open.
            assert_eq!(GuardDown::of(&error), None);
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            use tonic_types::StatusExt;
            assert_eq!(
                status.get_details_error_info().unwrap().reason,
                "PAYLOAD_TOO_LARGE"
            );
        }
        // Another gRPC stack says it with RESOURCE_EXHAUSTED.
        let go = tonic::Status::resource_exhausted(
            "grpc: received message larger than max (9437219 vs. 4194304)",
        );
        assert_eq!(
            GatewayError::from_status("guard", &go).code(),
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn invalid_arguments_name_their_field_in_a_bad_request() {
        use tonic_types::StatusExt;
        let cases = [
            (
                GatewayError::InvalidRequest {
                    field: "messages[0].role".into(),
                    message: "must be set".into(),
                },
                "messages[0].role",
            ),
            (
                GatewayError::TokensExceedRateLimit {
                    scope: "app:a".into(),
                    limit: 1_000,
                    charge: 4_104,
                },
                "max_tokens",
            ),
            (
                GatewayError::from_status(
                    "router",
                    &switchboard_status::status(
                        ErrorCode::InvalidArgument,
                        "router",
                        "invalid `request.tools[0]`",
                        HashMap::from([("field".to_owned(), "request.tools[0]".to_owned())]),
                    ),
                ),
                "request.tools[0]",
            ),
        ];
        for (error, field) in cases {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                status.get_details_error_info().unwrap().reason,
                "INVALID_ARGUMENT"
            );
            let bad = status.get_details_bad_request().unwrap();
            assert_eq!(bad.field_violations.len(), 1);
            assert_eq!(bad.field_violations[0].field, field);
            assert!(!bad.field_violations[0].description.is_empty());
        }
        // Other errors carry none.
        let status = tonic::Status::from(GatewayError::InvalidKey);
        assert!(status.get_details_bad_request().is_none());
    }

    #[test]
    fn typed_downstream_errors_keep_their_code() {
        let status =
            switchboard_status::status(ErrorCode::NotFound, "router", "no route", HashMap::new());
        assert_eq!(
            GatewayError::from_status("router", &status).code(),
            ErrorCode::NotFound
        );
    }
}
