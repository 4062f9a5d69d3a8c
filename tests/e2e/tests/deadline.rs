//! A gRPC caller's deadline (`grpc-timeout`) reaches the router: a provider slower than the
//! deadline ends in the router's own `TIMEOUT` answer with its attempts, which the caller gets as a
//! typed `DEADLINE_EXCEEDED` naming the request, and the usage row says `TIMEOUT` (not a client
//! that went away).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use switchboard_e2e::{MODEL, Sandbox, authed};
use switchboard_proto::{
    chat::v1::{ChatRequest, Message, Role},
    gateway::v1::{CreateChatCompletionRequest, StreamChatCompletionRequest},
    ledger::v1::RequestStatus,
};
use tonic_types::StatusExt;

/// Longer than the caller waits: every attempt outlives the deadline.
const PROVIDER_LATENCY_MS: u64 = 4_000;
const DEADLINE: Duration = Duration::from_millis(1_500);

fn chat() -> ChatRequest {
    ChatRequest {
        model: MODEL.to_owned(),
        messages: vec![Message::text(Role::User, "are you there?")],
        ..Default::default()
    }
}

/// The status is the router's TIMEOUT passed on (ErrorInfo, the attempts) with the request id;
/// returns the id.
fn request_id_of_timeout(status: &tonic::Status) -> String {
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.reason, "TIMEOUT", "{status:?}");
    assert!(
        info.metadata
            .get("attempts")
            .and_then(|a| a.parse::<u32>().ok())
            .is_some_and(|a| a >= 1),
        "the router's attempts: {status:?}"
    );
    status
        .metadata()
        .get("x-switchboard-request-id")
        .unwrap_or_else(|| panic!("no request id: {status:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callers_deadline_reaches_the_router_and_ends_in_a_typed_timeout_and_row() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.primary.set_latency(MODEL, PROVIDER_LATENCY_MS);
    sandbox.backup.set_latency(MODEL, PROVIDER_LATENCY_MS);
    let mut client = sandbox.gateway().await.unwrap();

    let mut unary = authed(
        CreateChatCompletionRequest {
            request: Some(chat()),
            ..Default::default()
        },
        switchboard_e2e::KEY_A,
    );
    unary.set_timeout(DEADLINE);
    let status = client
        .create_chat_completion(unary)
        .await
        .expect_err("the provider is slower than the deadline");
    let id = request_id_of_timeout(&status);
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.error_code, "TIMEOUT", "{row:?}");
    assert_eq!(row.status, RequestStatus::Error as i32, "{row:?}");
    assert!(row.attempts >= 1, "{row:?}");

    let mut stream = authed(
        StreamChatCompletionRequest {
            request: Some(chat()),
            ..Default::default()
        },
        switchboard_e2e::KEY_A,
    );
    stream.set_timeout(DEADLINE);
    let status = client
        .stream_chat_completion(stream)
        .await
        .expect_err("the provider is slower than the deadline");
    let id = request_id_of_timeout(&status);
    let row = sandbox.wait_for_record(&id).await.unwrap();
    assert_eq!(row.error_code, "TIMEOUT", "{row:?}");
    assert!(row.streamed, "{row:?}");

    sandbox.stop().await.unwrap();
}
