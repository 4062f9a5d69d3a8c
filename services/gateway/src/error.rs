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
    /// The body is not valid JSON or not a valid request.
    #[error("invalid request at `{field}`: {message}")]
    InvalidRequest { field: String, message: String },
    /// The body is larger than the configured limit.
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
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
    /// A required dependency (the guard, fail-closed) is unreachable.
    #[error("{service} is unavailable")]
    DependencyDown { service: &'static str },
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

impl GatewayError {
    /// Wraps a downstream status, keeping its code and `ErrorInfo` metadata.
    pub fn from_status(service: &'static str, status: &tonic::Status) -> Self {
        use tonic_types::StatusExt;
        // Our services always attach an ErrorInfo. A status without one comes from the transport
        // (connection refused, h2 stream reset, overload), so it says nothing about the request:
        // the dependency is unavailable, whatever gRPC code the transport chose.
        if status.get_details_error_info().is_none() {
            return match status.code() {
                tonic::Code::DeadlineExceeded => GatewayError::Downstream {
                    code: ErrorCode::Timeout,
                    message: format!("{service} did not answer in time"),
                    metadata: HashMap::new(),
                },
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
        let code = self.code();
        let message = if code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        let param = match self {
            GatewayError::InvalidRequest { field, .. } => Some(field.clone()),
            GatewayError::Downstream { metadata, .. } => {
                metadata.get("field").or(metadata.get("model")).cloned()
            }
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: code.openai_type(),
                param,
                code: code.as_str(),
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
            GatewayError::MissingKey | GatewayError::InvalidKey => ErrorCode::Unauthenticated,
            GatewayError::InvalidRequest { .. } => ErrorCode::InvalidArgument,
            GatewayError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            GatewayError::Blocked { .. } => ErrorCode::PermissionDenied,
            GatewayError::Downstream { code, .. } => *code,
            GatewayError::DependencyDown { .. } | GatewayError::Overloaded { .. } => {
                ErrorCode::Unavailable
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
            GatewayError::PayloadTooLarge { limit, .. } => {
                HashMap::from([("limit".to_owned(), limit.to_string())])
            }
            GatewayError::Downstream { metadata, .. } => metadata.clone(),
            GatewayError::DependencyDown { service } => {
                HashMap::from([("service".to_owned(), (*service).to_owned())])
            }
            _ => HashMap::new(),
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
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
    fn typed_downstream_errors_keep_their_code() {
        let status =
            switchboard_status::status(ErrorCode::NotFound, "router", "no route", HashMap::new());
        assert_eq!(
            GatewayError::from_status("router", &status).code(),
            ErrorCode::NotFound
        );
    }
}
