//! Wiring: database, prices, NATS consumer and the gRPC server.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::PullConsumer};
use switchboard_bus::NatsConfig;
use switchboard_proto::ledger::v1::ledger_service_server::LedgerServiceServer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    budget::{Budget, BudgetStore},
    config::Config,
    consumer::{ConsumerSettings, UsageConsumer, set_up},
    error::StartupError,
    grpc::LedgerApi,
    metrics::Metrics,
    partitions::{Partitions, maintenance_loop},
    reload::{Fingerprint, SharedPrices, reload_loop},
    repo::Repository,
};

/// gRPC service name reported by the health service.
pub const SERVICE_NAME: &str = "switchboard.ledger.v1.LedgerService";

/// A started (bound and connected) ledger.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    repo: Repository,
    consumer: UsageConsumer,
    pull: PullConsumer,
    metrics_listener: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    reload: Option<(Duration, Fingerprint)>,
    partitions: Arc<Partitions>,
    /// Partition maintenance: every, months ahead.
    maintenance: (Duration, u32),
    /// The guard's audit events (second durable consumer).
    audit: (crate::audit::AuditConsumer, PullConsumer),
}

impl App {
    /// Validates the configuration, creates and migrates the database, records the configured
    /// prices, applies the declared budgets (`[[ledger.budgets]]`), connects NATS (creating the
    /// usage stream and the durable consumer when missing) and binds the gRPC listener.
    pub async fn build(config: Config, nats: NatsConfig) -> Result<App, StartupError> {
        config.validate()?;
        let prices = config.parsed_prices()?;
        let budgets = config.parsed_budgets()?;
        let repo = Repository::connect(&config.database_url, config.max_connections).await?;
        repo.sync_prices(&prices).await?;
        apply_declared_budgets(&repo, &budgets).await?;
        // Fingerprint first: a version added while loading is picked up by the next reload.
        let fingerprint = repo
            .prices_fingerprint()
            .await
            .map_err(|e| StartupError::Database(crate::repo::RepoError::Database(e)))?;
        let book = repo.load_prices().await?;
        tracing::info!(prices = book.len(), "price history loaded");
        let metrics = Arc::new(Metrics::default());
        metrics.prices_loaded(book.len());
        let prices = SharedPrices::new(book);
        let partitions = Arc::new(Partitions::new(
            repo.pool().clone(),
            config.retention_months,
        ));

        let client = nats.connect().await?;
        let js = jetstream::new(client);
        let settings = ConsumerSettings {
            name: config.consumer_name.clone(),
            batch_size: config.batch_size,
            linger: Duration::from_millis(config.linger_ms),
            ack_wait: Duration::from_secs(config.ack_wait_secs),
        };
        let pull = set_up(&js, &nats, &settings).await?;
        let audit_pull =
            crate::audit::set_up(&js, &nats, &settings.name, settings.ack_wait).await?;
        let audit = crate::audit::AuditConsumer {
            js: js.clone(),
            nats: nats.clone(),
            name: settings.name.clone(),
            ack_wait: settings.ack_wait,
            batch_size: settings.batch_size,
            pool: repo.pool().clone(),
        };

        let listener = switchboard_grpc::bind(&config.grpc_addr).await?;
        let local_addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
        let (metrics_listener, metrics_addr) = match &config.metrics_addr {
            None => (None, None),
            Some(addr) => {
                let bind_error = |source| StartupError::MetricsBind {
                    addr: addr.clone(),
                    source,
                };
                let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                tracing::info!(metrics.addr = %bound, "ledger metrics endpoint bound");
                (Some(listener), Some(bound))
            }
        };
        let consumer = UsageConsumer {
            js,
            nats,
            settings,
            repo: repo.clone(),
            prices,
            metrics,
            partitions: partitions.clone(),
        };
        let reload = (config.price_reload_secs > 0)
            .then(|| (Duration::from_secs(config.price_reload_secs), fingerprint));
        Ok(App {
            listener,
            local_addr,
            repo,
            consumer,
            pull,
            metrics_listener,
            metrics_addr,
            reload,
            partitions,
            maintenance: (
                Duration::from_secs(config.partition_maintenance_secs),
                config.partitions_ahead,
            ),
            audit: (audit, audit_pull),
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, when `metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves gRPC and consumes usage events until `shutdown` resolves.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let App {
            listener,
            local_addr,
            repo,
            consumer,
            pull,
            metrics_listener,
            reload,
            partitions,
            maintenance,
            audit,
            ..
        } = self;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let metrics = consumer.metrics.clone();
        if let Some((every, fingerprint)) = reload {
            tasks.spawn(reload_loop(
                repo.clone(),
                consumer.prices.clone(),
                metrics.clone(),
                every,
                fingerprint,
                cancel.clone(),
            ));
        }
        if let Some(listener) = metrics_listener {
            let metrics = metrics.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move { metrics.render() }
                }),
            );
            let stop = cancel.clone();
            tasks.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "ledger metrics endpoint failed");
                }
            });
        }
        let budgets = crate::budget_grpc::server(
            repo.pool().clone(),
            consumer.prices.clone(),
            consumer.js.client(),
            consumer.nats.subject_prefix.clone(),
        );
        tasks.spawn(maintenance_loop(
            partitions,
            maintenance.0,
            maintenance.1,
            cancel.clone(),
        ));
        tasks.spawn(consumer.run(pull, cancel.clone()));
        tasks.spawn(audit.0.run(audit.1, cancel.clone()));
        tasks.close();

        tracing::info!(grpc.addr = %local_addr, "ledger listening");
        let routes =
            tonic::service::Routes::new(LedgerServiceServer::new(LedgerApi::new(repo.clone())))
                .add_service(budgets);
        let names = [SERVICE_NAME, crate::budget_grpc::BUDGET_SERVICE_NAME];
        let served = switchboard_grpc::serve(listener, routes, &names, shutdown).await;

        cancel.cancel();
        tasks.wait().await;
        repo.pool().close().await;
        served?;
        Ok(())
    }
}

/// Upserts the budgets declared in configuration (`BudgetStore::apply_declared`) and logs what
/// changed; declared budgets no longer in the configuration are kept and warned about.
async fn apply_declared_budgets(repo: &Repository, budgets: &[Budget]) -> Result<(), StartupError> {
    let applied = BudgetStore::new(repo.pool().clone())
        .apply_declared(budgets)
        .await
        .map_err(StartupError::Budgets)?;
    for id in &applied.created {
        tracing::info!(budget.id = %id, "declared budget created");
    }
    for id in &applied.updated {
        tracing::info!(budget.id = %id, "declared budget updated from the configuration");
    }
    for id in &applied.undeclared {
        tracing::warn!(
            budget.id = %id,
            "budget no longer declared in ledger.budgets; left as it is and still enforced"
        );
    }
    tracing::info!(
        created = applied.created.len(),
        updated = applied.updated.len(),
        unchanged = applied.unchanged.len(),
        "declared budgets applied"
    );
    Ok(())
}
