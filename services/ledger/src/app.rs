//! Wiring: database, prices, NATS consumer and the gRPC server.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::PullConsumer};
use switchboard_bus::NatsConfig;
use switchboard_grpc::{ConfigFile, ConfigWatch, MetricsEndpoint};
use switchboard_proto::ledger::v1::ledger_service_server::LedgerServiceServer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    config_reload::{ConfigReloader, apply_configured, log_outcome},
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
    metrics_endpoint: Option<MetricsEndpoint>,
    reload: Option<(Duration, Fingerprint)>,
    partitions: Arc<Partitions>,
    /// Partition maintenance: every, months ahead.
    maintenance: (Duration, u32),
    /// The guard's audit events (second durable consumer).
    audit: (crate::audit::AuditConsumer, PullConsumer),
    /// The configuration the ledger was built with (a reload keeps its restart-only settings).
    config: Config,
    /// How often the configuration file is checked for a change (`ledger.config_poll_ms`).
    config_poll: Duration,
    /// How often the database is checked for the gRPC health (`ledger.db_check_ms`).
    db_check: Duration,
    /// Set by [`App::watch_config`].
    watch: Option<ConfigWatch>,
}

impl App {
    /// Validates the configuration, creates and migrates the database, records the configured
    /// prices and applies the declared budgets (`[[ledger.budgets]]`) in one transaction, connects
    /// NATS (creating the usage stream and the durable consumer when missing) and binds the gRPC
    /// listener.
    pub async fn build(config: Config, nats: NatsConfig) -> Result<App, StartupError> {
        config.validate()?;
        let prices = config.parsed_prices()?;
        let budgets = config.parsed_budgets()?;
        let repo = Repository::connect(&config.database_url, config.max_connections).await?;
        log_outcome(&apply_configured(&repo, &prices, &budgets).await?);
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
        let metrics_endpoint =
            MetricsEndpoint::bind_configured("ledger", config.metrics_addr.as_deref()).await?;
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
            metrics_endpoint,
            reload,
            partitions,
            maintenance: (
                Duration::from_secs(config.partition_maintenance_secs),
                config.partitions_ahead,
            ),
            audit: (audit, audit_pull),
            config_poll: Duration::from_millis(config.config_poll_ms),
            db_check: Duration::from_millis(config.db_check_ms),
            config,
            watch: None,
        })
    }

    /// Reloads the configuration from `file` on SIGHUP and whenever the file's modification time
    /// changes (checked every `ledger.config_poll_ms`) while [`App::run_until`] runs: the
    /// configured prices and declared budgets are applied again, as at start; an invalid file is
    /// refused and the running configuration stays. Installs the SIGHUP handler (call within a
    /// tokio runtime; a SIGHUP no longer ends the process).
    pub fn watch_config(&mut self, file: &ConfigFile) {
        self.watch = Some(file.watch(self.config_poll));
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, when `metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint
            .as_ref()
            .map(MetricsEndpoint::local_addr)
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
            metrics_endpoint,
            reload,
            partitions,
            maintenance,
            audit,
            config,
            watch,
            db_check,
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
        if let Some(watch) = watch {
            let reloader = ConfigReloader::new(
                repo.clone(),
                consumer.prices.clone(),
                metrics.clone(),
                config,
            );
            tasks.spawn(crate::config_reload::watch(watch, reloader, cancel.clone()));
        }
        if let Some(endpoint) = metrics_endpoint {
            let metrics = metrics.clone();
            tasks.spawn(endpoint.serve(move || metrics.render(), cancel.clone().cancelled_owned()));
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
        let names = [SERVICE_NAME, crate::budget_grpc::BUDGET_SERVICE_NAME];
        let health = switchboard_grpc::Health::new(&names);
        tasks.spawn(crate::health::follow_database(
            repo.pool().clone(),
            health.clone(),
            db_check,
            cancel.clone(),
        ));
        tasks.close();

        tracing::info!(grpc.addr = %local_addr, "ledger listening");
        let routes = tonic::service::Routes::new(
            // Finance's stubs may compress their requests.
            LedgerServiceServer::new(LedgerApi::new(repo.clone()))
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .add_service(budgets);
        let served = switchboard_grpc::serve_with_health(listener, routes, health, shutdown).await;

        cancel.cancel();
        tasks.wait().await;
        repo.pool().close().await;
        served?;
        Ok(())
    }
}
