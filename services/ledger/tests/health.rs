//! The ledger's `grpc.health.v1` follows its database: SERVING while Postgres answers,
//! NOT_SERVING while it cannot be reached (a TCP proxy in front of the test database is cut),
//! SERVING again once it is back.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use switchboard_ledger::{App, Config};
use switchboard_testkit::{TestNats, TestPg, pg_server_url};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A TCP proxy to Postgres that the test can cut (every connection closed, new ones refused) and
/// restore.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let (accepting, gen_tx, until) = (up.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    () = until.cancelled() => return,
                };
                if !accepting.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen_tx.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
            stop,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn until_health(
    client: &mut HealthClient<switchboard_grpc::ClientChannel>,
    want: ServingStatus,
) {
    let mut last = None;
    for _ in 0..200 {
        let mut all = true;
        for service in ["", switchboard_ledger::SERVICE_NAME] {
            let status = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            all &= status == want as i32;
            last = Some(status);
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ledger health never reported {want:?}; last: {last:?}");
}

#[tokio::test]
async fn health_is_not_serving_while_postgres_is_unreachable_and_serving_when_it_is_back() {
    let pg = TestPg::create().await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let server = pg_server_url();
    // postgres://user@host:port → host:port
    let authority = server
        .rsplit('@')
        .next()
        .unwrap()
        .trim_start_matches("postgres://");
    let proxy = Proxy::start(authority.to_owned()).await;
    let config = Config {
        grpc_addr: "127.0.0.1:0".into(),
        database_url: pg.url.replace(authority, &proxy.addr.to_string()),
        max_connections: 2,
        db_check_ms: 100,
        ..Config::default()
    };
    let app = App::build(config, nats.config()).await.unwrap();
    let url = switchboard_grpc::url_of(app.local_addr());
    let stop = CancellationToken::new();
    let until = stop.clone();
    let task = tokio::spawn(app.run_until(async move { until.cancelled().await }));
    let mut client = HealthClient::new(switchboard_grpc::client(&url).await.unwrap());

    until_health(&mut client, ServingStatus::Serving).await;
    proxy.cut();
    until_health(&mut client, ServingStatus::NotServing).await;
    proxy.restore();
    until_health(&mut client, ServingStatus::Serving).await;

    drop(client);
    stop.cancel();
    task.await.unwrap().unwrap();
    proxy.stop.cancel();
    nats.cleanup().await;
    pg.drop_db().await;
}
