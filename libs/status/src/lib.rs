//! The small set of error codes every Switchboard service speaks, mapped to gRPC and HTTP in one place.
//!
//! Each service has one request-path error enum that implements [`ServiceError`]. Converting it to a
//! [`tonic::Status`] goes through [`to_status`], which attaches a `google.rpc.ErrorInfo` detail
//! (`reason` = the stable code name, `domain` = the service) so that callers branch on the reason and
//! never on the message. The gateway turns a status back into an OpenAI-style HTTP error with
//! [`ErrorCode::from_status`] and [`ErrorCode::http_status`].

use std::collections::HashMap;

use tonic_types::{ErrorDetails, StatusExt};

/// The stable error codes. Names are part of the API (they appear as `ErrorInfo.reason` and as the
/// `code` of OpenAI-style error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or fails validation.
    InvalidArgument,
    /// No credentials, or credentials that do not match any key.
    Unauthenticated,
    /// The caller may not do this (for example a guard block).
    PermissionDenied,
    /// The requested model (route) or record does not exist.
    NotFound,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// A rate limit or budget was hit.
    RateLimited,
    /// Every provider target failed.
    UpstreamUnavailable,
    /// A provider rejected the request as invalid (context too long, bad parameters).
    UpstreamRejected,
    /// A deadline passed.
    Timeout,
    /// A dependency of ours is down.
    Unavailable,
    /// A bug or an unexpected failure; details are logged, not returned.
    Internal,
    /// The caller asked for a cached answer only (`only-if-cached`) and there is none: gRPC
    /// NOT_FOUND, HTTP 504 as RFC 9111 prescribes for `only-if-cached`.
    NotCached,
}

impl ErrorCode {
    /// The stable name (`ErrorInfo.reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            ErrorCode::UpstreamRejected => "UPSTREAM_REJECTED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::NotCached => "NOT_CACHED",
        }
    }

    /// Every code, in declaration order (bounded label values, for example).
    pub const ALL: [ErrorCode; 12] = ALL;

    /// Parses a stable name.
    pub fn parse(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|code| code.as_str() == name)
    }

    /// The gRPC code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::PayloadTooLarge => tonic::Code::InvalidArgument,
            ErrorCode::RateLimited => tonic::Code::ResourceExhausted,
            ErrorCode::UpstreamUnavailable => tonic::Code::Unavailable,
            ErrorCode::UpstreamRejected => tonic::Code::FailedPrecondition,
            ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
            ErrorCode::NotCached => tonic::Code::NotFound,
        }
    }

    /// The HTTP status.
    pub fn http_status(self) -> http::StatusCode {
        match self {
            ErrorCode::InvalidArgument => http::StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => http::StatusCode::FORBIDDEN,
            ErrorCode::NotFound => http::StatusCode::NOT_FOUND,
            ErrorCode::PayloadTooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => http::StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamUnavailable => http::StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamRejected => http::StatusCode::BAD_REQUEST,
            ErrorCode::Timeout => http::StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::NotCached => http::StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OpenAI error `type` for an HTTP body.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UpstreamRejected => "invalid_request_error",
            ErrorCode::Unauthenticated => "authentication_error",
            ErrorCode::PermissionDenied => "permission_error",
            ErrorCode::NotFound | ErrorCode::NotCached => "not_found_error",
            ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::UpstreamUnavailable | ErrorCode::Timeout | ErrorCode::Unavailable => {
                "api_error"
            }
            ErrorCode::Internal => "server_error",
        }
    }

    /// The code a status carries: its `ErrorInfo.reason` when it has one, else derived from the gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        if let Some(info) = status.get_details_error_info()
            && let Some(code) = ErrorCode::parse(&info.reason)
        {
            return code;
        }
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidArgument,
            tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
            tonic::Code::PermissionDenied => ErrorCode::PermissionDenied,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
            tonic::Code::Unavailable => ErrorCode::Unavailable,
            tonic::Code::FailedPrecondition => ErrorCode::UpstreamRejected,
            _ => ErrorCode::Internal,
        }
    }
}

const ALL: [ErrorCode; 12] = [
    ErrorCode::InvalidArgument,
    ErrorCode::Unauthenticated,
    ErrorCode::PermissionDenied,
    ErrorCode::NotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::RateLimited,
    ErrorCode::UpstreamUnavailable,
    ErrorCode::UpstreamRejected,
    ErrorCode::Timeout,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::NotCached,
];

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's request-path error.
pub trait ServiceError: std::error::Error {
    /// The stable code.
    fn code(&self) -> ErrorCode;
    /// Extra `ErrorInfo.metadata` (for example the field that failed validation). Never a prompt or a secret.
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }
    /// Invalid request fields as (field path, description), sent as a `google.rpc.BadRequest`
    /// detail next to `ErrorInfo` when not empty. Never a prompt or a secret.
    fn field_violations(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The `reason` in the metadata of a guard that refused a check to bound its queue (UNAVAILABLE);
/// the gateway tells it apart from a guard that is down (`cause = overloaded`).
pub const GUARD_OVERLOADED: &str = "GUARD_OVERLOADED";

/// `ErrorInfo.metadata.cause` of the router's refusal of a prompt too long for every target that
/// could take it (reason `UPSTREAM_REJECTED`); the gateway answers it with OpenAI's own code.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// Response metadata of the router's `RouteStream`: which deployment the stream committed to, sent
/// with the response head (before the first chunk), so that a stream cut short before the router's
/// final `RouteInfo` (the caller gone, a refusal) is still recorded against its provider and priced.
pub mod serving {
    /// Provider name from configuration.
    pub const PROVIDER: &str = "switchboard-serving-provider";
    /// The provider's model.
    pub const MODEL: &str = "switchboard-serving-model";
    /// The target (`provider/model`).
    pub const TARGET: &str = "switchboard-serving-target";
    /// Alias of the configured key (absent for the provider's own key).
    pub const KEY_ALIAS: &str = "switchboard-serving-key-alias";
    /// Attempts made, the serving one included.
    pub const ATTEMPTS: &str = "switchboard-serving-attempts";
    /// What the attempts consumed by the first chunk, as their providers reported it: a
    /// `switchboard.chat.v1.RouteInfo` (protobuf, binary metadata) whose attempts are the failed
    /// ones (with the usage reported before they failed) and the serving one last (with the usage
    /// its provider reported before its first chunk: Anthropic's `message_start`, Gemini's
    /// `usageMetadata`). Sent only when some attempt has such a report; a caller that stops
    /// reading before the stream's end bills from it instead of an estimate.
    pub const CONSUMED: &str = "switchboard-serving-consumed-bin";
}

/// Converts a service error into a status with an `ErrorInfo` detail. `Internal` errors are logged
/// here, once, and returned with a generic message.
pub fn to_status(domain: &'static str, error: &dyn ServiceError) -> tonic::Status {
    let code = error.code();
    let message = if code == ErrorCode::Internal {
        tracing::error!(error.domain = domain, error = %error, "internal error");
        "internal error".to_owned()
    } else {
        error.to_string()
    };
    let violations = error.field_violations();
    if violations.is_empty() {
        return status(code, domain, message, error.metadata());
    }
    let mut details = ErrorDetails::with_error_info(code.as_str(), domain, error.metadata());
    for (field, description) in violations {
        details.add_bad_request_violation(field, description);
    }
    tonic::Status::with_error_details(code.grpc(), message, details)
}

/// Builds a status with an `ErrorInfo` detail.
pub fn status(
    code: ErrorCode,
    domain: &str,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> tonic::Status {
    let details = ErrorDetails::with_error_info(code.as_str(), domain, metadata);
    tonic::Status::with_error_details(code.grpc(), message, details)
}

/// The `ErrorInfo.metadata` of a status (empty when it has none).
pub fn status_metadata(status: &tonic::Status) -> HashMap<String, String> {
    status
        .get_details_error_info()
        .map(|info| info.metadata)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("model `x` not found")]
    struct Missing;
    impl ServiceError for Missing {
        fn code(&self) -> ErrorCode {
            ErrorCode::NotFound
        }
        fn metadata(&self) -> HashMap<String, String> {
            HashMap::from([("model".to_owned(), "x".to_owned())])
        }
    }

    #[test]
    fn status_round_trips_the_code_and_metadata() {
        let status = to_status("router", &Missing);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(ErrorCode::from_status(&status), ErrorCode::NotFound);
        assert_eq!(
            status_metadata(&status).get("model").map(String::as_str),
            Some("x")
        );
        assert_eq!(status.message(), "model `x` not found");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("invalid `group_by[1]`")]
    struct BadField;
    impl ServiceError for BadField {
        fn code(&self) -> ErrorCode {
            ErrorCode::InvalidArgument
        }
        fn field_violations(&self) -> Vec<(String, String)> {
            vec![("group_by[1]".to_owned(), "unknown dimension".to_owned())]
        }
    }

    #[test]
    fn field_violations_travel_as_bad_request_next_to_error_info() {
        let status = to_status("ledger", &BadField);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(ErrorCode::from_status(&status), ErrorCode::InvalidArgument);
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "group_by[1]");
        assert_eq!(bad.field_violations[0].description, "unknown dimension");
        // Without violations there is no BadRequest detail.
        assert!(
            to_status("router", &Missing)
                .get_details_bad_request()
                .is_none()
        );
    }

    #[test]
    fn every_code_parses_back() {
        for code in ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
    }

    #[test]
    fn not_cached_is_not_found_over_grpc_and_504_over_http() {
        let status = status(
            ErrorCode::NotCached,
            "gateway",
            "not cached",
            HashMap::new(),
        );
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(ErrorCode::from_status(&status), ErrorCode::NotCached);
        assert_eq!(
            ErrorCode::NotCached.http_status(),
            http::StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn payload_too_large_is_distinguishable_from_invalid_argument() {
        let status = status(
            ErrorCode::PayloadTooLarge,
            "gateway",
            "too big",
            HashMap::new(),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(ErrorCode::from_status(&status), ErrorCode::PayloadTooLarge);
        assert_eq!(
            ErrorCode::PayloadTooLarge.http_status(),
            http::StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
