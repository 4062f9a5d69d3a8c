//! `grpc.health.v1` as a service reports it through [`Health`]: SERVING at start, NOT_SERVING
//! while the service says it cannot serve, and NOT_SERVING for good once the server drains.

#![allow(clippy::unwrap_used)]

use futures::StreamExt as _;
use switchboard_grpc::{Health, bind, client, serve_with_health, url_of};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const NAME: &str = "test.Service";

async fn check(
    client: &mut HealthClient<switchboard_grpc::ClientChannel>,
    service: &str,
) -> ServingStatus {
    let status = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test]
async fn health_follows_the_service_and_turns_not_serving_when_the_server_drains() {
    let listener = bind("127.0.0.1:0").await.unwrap();
    let url = url_of(listener.local_addr().unwrap());
    let health = Health::new(&[NAME]);
    let stop = CancellationToken::new();
    let until = stop.clone();
    let server = tokio::spawn(serve_with_health(
        listener,
        Routes::default(),
        health.clone(),
        async move { until.cancelled().await },
    ));
    let mut health_client = HealthClient::new(client(&url).await.unwrap());
    for service in [NAME, ""] {
        assert_eq!(
            check(&mut health_client, service).await,
            ServingStatus::Serving
        );
    }

    health.set_serving(false).await;
    assert!(!health.is_serving());
    for service in [NAME, ""] {
        assert_eq!(
            check(&mut health_client, service).await,
            ServingStatus::NotServing
        );
    }
    health.set_serving(true).await;
    assert_eq!(
        check(&mut health_client, NAME).await,
        ServingStatus::Serving
    );

    // A watcher (client-side health checking) sees the drain before the connection goes.
    let mut watch = health_client
        .watch(HealthCheckRequest {
            service: NAME.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap().status;
    assert_eq!(first, ServingStatus::Serving as i32);
    stop.cancel();
    let next = watch.next().await.unwrap().unwrap().status;
    assert_eq!(next, ServingStatus::NotServing as i32);
    assert!(!health.is_serving());
    // Once draining, the service cannot turn it back.
    health.set_serving(true).await;
    assert!(!health.is_serving());
    drop(watch);
    drop(health_client);
    server.await.unwrap().unwrap();
}
