//! A router `App` on port 0 in front of named fake providers, for the routing and fault suites.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;

use futures::StreamExt;
use switchboard_fake_provider::{FakeConfig, FakeProvider};
use switchboard_proto::{
    chat::v1::{ChatChunk, ChatRequest, Message, Role, RouteInfo},
    router::v1::{
        Caller, RouteRequest, RouteResponse, RouteStreamRequest, route_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};
use switchboard_router::{App, Config, ProviderConfig};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};
use tonic_types::StatusExt;

pub struct Mesh {
    pub fakes: HashMap<String, FakeProvider>,
    pub client: RouterServiceClient<Channel>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Mesh {
    /// Starts one fake provider per name (registered as a provider of that name, key
    /// `sk-<name>`), then the router with the configuration `adjust` makes.
    pub async fn start(providers: &[&str], adjust: impl FnOnce(&mut Config)) -> Mesh {
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".to_owned(),
            retry_backoff_ms: 1,
            max_retries: 1,
            ..Config::default()
        };
        let mut fakes = HashMap::new();
        for name in providers {
            let fake = FakeProvider::start(FakeConfig {
                addr: "127.0.0.1:0".to_owned(),
                ..FakeConfig::default()
            })
            .await
            .unwrap();
            config.providers.insert(
                (*name).to_owned(),
                ProviderConfig::openai(fake.base_url(), Some(&format!("sk-{name}"))),
            );
            fakes.insert((*name).to_owned(), fake);
        }
        adjust(&mut config);
        let app = App::build(config).await.unwrap();
        let metrics_addr = app.metrics_addr();
        let url = switchboard_grpc::url_of(app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let client = RouterServiceClient::connect(url).await.unwrap();
        Mesh {
            fakes,
            client,
            metrics_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn fake(&self, name: &str) -> &FakeProvider {
        &self.fakes[name]
    }

    pub async fn route_as(
        &self,
        request: ChatRequest,
        caller: Caller,
    ) -> Result<RouteResponse, Status> {
        self.client
            .clone()
            .route(RouteRequest {
                request: Some(request),
                caller: Some(caller),
                allowance: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn route(&self, request: ChatRequest) -> Result<RouteResponse, Status> {
        self.route_as(request, Caller::default()).await
    }

    /// Chunks and route info of a stream, plus the error that ended it, if any.
    pub async fn stream(
        &self,
        request: ChatRequest,
    ) -> Result<(Vec<ChatChunk>, Option<RouteInfo>, Option<Status>), Status> {
        let mut stream = self
            .client
            .clone()
            .route_stream(RouteStreamRequest {
                request: Some(request),
                caller: None,
                allowance: None,
            })
            .await?
            .into_inner();
        let (mut chunks, mut info, mut error) = (Vec::new(), None, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(message) => match message.event.unwrap() {
                    Event::Chunk(chunk) => {
                        assert!(info.is_none(), "no chunk after the route info");
                        chunks.push(chunk);
                    }
                    Event::Route(route) => info = Some(route),
                    // A cut's account of its attempts (tests/cut_usage.rs).
                    Event::Interrupted(_) => {}
                },
                Err(status) => {
                    error = Some(status);
                    break;
                }
            }
        }
        Ok((chunks, info, error))
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        for (_, fake) in self.fakes.drain() {
            fake.shutdown().await;
        }
    }
}

pub fn chat(model: &str, text: &str) -> ChatRequest {
    ChatRequest {
        model: model.to_owned(),
        messages: vec![Message::text(Role::User, text)],
        ..Default::default()
    }
}

pub fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// `(target, error_code, http_status)` of every attempt.
pub fn attempts(info: &RouteInfo) -> Vec<(String, String, u32)> {
    info.attempts
        .iter()
        .map(|a| (a.target.clone(), a.error_code.clone(), a.http_status))
        .collect()
}

pub fn text_of(response: &RouteResponse) -> String {
    response.response.as_ref().unwrap().choices[0]
        .message
        .as_ref()
        .unwrap()
        .joined_text()
}
