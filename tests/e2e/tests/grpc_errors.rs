//! The gateway's gRPC answers name their request and its validation errors name their fields the
//! standard way: `ListModels` carries `x-switchboard-request-id` (answer and error), and an
//! `INVALID_ARGUMENT` carries a `google.rpc.BadRequest` with the field next to its `ErrorInfo`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchboard_e2e::{KEY_A, Sandbox, authed};
use switchboard_proto::gateway::v1::{CreateChatCompletionRequest, ListModelsRequest};
use tonic_types::StatusExt;

const REQUEST_ID: &str = "x-switchboard-request-id";

#[tokio::test(flavor = "multi_thread")]
async fn list_models_names_its_request() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut client = sandbox.gateway().await.unwrap();

    let listed = client
        .list_models(authed(ListModelsRequest {}, KEY_A))
        .await
        .unwrap();
    assert!(
        listed.metadata().get(REQUEST_ID).is_some(),
        "{:?}",
        listed.metadata()
    );
    assert!(!listed.get_ref().models.is_empty());

    sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_arguments_carry_a_bad_request_with_the_field() {
    let sandbox = Sandbox::start().await.unwrap();
    let mut client = sandbox.gateway().await.unwrap();
    let refused = client
        .create_chat_completion(authed(CreateChatCompletionRequest::default(), KEY_A))
        .await
        .expect_err("no request");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.get_details_error_info().unwrap().metadata["field"],
        "request"
    );
    let bad = refused
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest: {refused:?}"));
    assert_eq!(bad.field_violations.len(), 1, "{bad:?}");
    assert_eq!(bad.field_violations[0].field, "request");
    assert_eq!(bad.field_violations[0].description, "must be set");
    assert!(refused.metadata().get(REQUEST_ID).is_some());

    sandbox.stop().await.unwrap();
}
