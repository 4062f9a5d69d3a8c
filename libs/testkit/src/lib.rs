//! Test fixtures shared by the services' API tests and the end-to-end suite. Dev-dependency only.
//!
//! - [`TestPg`]: a fresh Postgres database per test on the machine's server.
//! - [`TestNats`]: a unique subject prefix and stream name per test on the machine's NATS.
//! - [`otlp`]: an in-process OTLP/gRPC trace receiver.
//!
//! Nothing here skips: when Postgres or NATS is down the fixture fails loudly, because CI starts them.

pub mod otlp;

use sqlx::{Connection, PgConnection};

/// Base URL of the local Postgres server (trust auth). Override with `SWITCHBOARD_TEST_PG`.
pub fn pg_server_url() -> String {
    std::env::var("SWITCHBOARD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// URL of the local NATS server. Override with `SWITCHBOARD_TEST_NATS`.
pub fn nats_url() -> String {
    std::env::var("SWITCHBOARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A database created for one test.
pub struct TestPg {
    /// Connection URL of the new database.
    pub url: String,
    /// Its name.
    pub name: String,
}

impl TestPg {
    /// Creates a new, empty database named `sbtest_<uuid>`.
    pub async fn create() -> anyhow::Result<Self> {
        let server = pg_server_url();
        let name = format!("sbtest_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .map_err(|e| {
                anyhow::anyhow!("Postgres at {server} is not reachable (CI starts it): {e}")
            })?;
        let sql = format!("CREATE DATABASE {name}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(TestPg {
            url: format!("{server}/{name}"),
            name,
        })
    }

    /// Drops the database (best effort; leftovers are named `sbtest_*`).
    pub async fn drop_db(self) {
        let server = pg_server_url();
        if let Ok(mut admin) = PgConnection::connect(&format!("{server}/postgres")).await {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await;
        }
    }
}

/// The creation time of a test's or a bench run's stream, from its name: `TEST_` or `BENCH_`, then
/// the namespace's UUIDv7 (32 hex digits, any case, whose first 12 are Unix milliseconds), then
/// anything (`_AUDIT`, `_CACHE`). `None` for any other name.
fn stream_created_ms(name: &str) -> Option<u64> {
    let rest = name
        .strip_prefix("TEST_")
        .or_else(|| name.strip_prefix("BENCH_"))?;
    let id = rest.get(..32)?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) || !matches!(rest.get(32..33), None | Some("_")) {
        return None;
    }
    u64::from_str_radix(&id[..12], 16).ok()
}

/// Deletes the test and bench streams created more than `age` ago (best effort): a run that was
/// killed or panicked before its cleanup leaves its streams, and JetStream reserves storage for
/// each, so enough of them make every later stream creation fail.
pub async fn delete_stale_streams(client: async_nats::Client, age: std::time::Duration) {
    use tokio_stream::StreamExt;
    let js = async_nats::jetstream::new(client);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let cutoff = now.saturating_sub(age.as_millis() as u64);
    let mut names = js.stream_names();
    let mut stale = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        if stream_created_ms(&name).is_some_and(|at| at < cutoff) {
            stale.push(name);
        }
    }
    for name in stale {
        let _ = js.delete_stream(&name).await;
    }
}

/// A NATS namespace for one test: a unique subject prefix and stream name.
#[derive(Debug, Clone)]
pub struct TestNats {
    /// Server URL.
    pub url: String,
    /// Subject prefix, `test.<uuid>`.
    pub prefix: String,
    /// Usage stream name, `TEST_<uuid>`.
    pub stream: String,
}

impl TestNats {
    /// A fresh namespace; checks the server is reachable. The first one of a process also
    /// deletes the streams that runs of more than an hour ago left behind (see
    /// [`delete_stale_streams`]).
    pub async fn create() -> anyhow::Result<Self> {
        let url = nats_url();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let client = async_nats::connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("NATS at {url} is not reachable (CI starts it): {e}"))?;
        static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        SWEPT
            .get_or_init(|| delete_stale_streams(client, std::time::Duration::from_secs(3_600)))
            .await;
        Ok(TestNats {
            url,
            prefix: format!("test.{id}"),
            stream: format!("TEST_{id}"),
        })
    }

    /// The services' NATS settings for this namespace (its URL, subject prefix and usage stream;
    /// the rest as configured by default).
    pub fn config(&self) -> switchboard_bus::NatsConfig {
        switchboard_bus::NatsConfig {
            url: self.url.clone(),
            subject_prefix: self.prefix.clone(),
            usage_stream: self.stream.clone(),
            ..Default::default()
        }
    }

    /// The names of every stream the services make in this namespace: the usage stream, and the
    /// ones they derive from the subject prefix (the guard's audit events, the cache's
    /// replication log).
    pub fn streams(&self) -> [String; 3] {
        let config = self.config();
        [
            self.stream.clone(),
            config.audit_stream(),
            config.cache_stream(),
        ]
    }

    /// Deletes the test's streams (best effort; [`TestNats::streams`]). JetStream reserves
    /// storage for every stream, so one left behind per test fills it over runs.
    pub async fn cleanup(&self) {
        if let Ok(client) = async_nats::connect(&self.url).await {
            let js = async_nats::jetstream::new(client);
            for stream in self.streams() {
                let _ = js.delete_stream(stream).await;
            }
        }
    }
}

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago, for a child process to listen
/// on. They are drawn at random from below the kernel's ephemeral range (Linux:
/// `/proc/sys/net/ipv4/ip_local_port_range`): a port handed out by `bind(":0")` is in that range,
/// and any outgoing connection of a test running in parallel may take it as its local port before
/// the child binds it. Below the range only another listener can take it. Falls back to `:0`
/// ports when the range leaves no room below it.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::{
        hash::{BuildHasher, RandomState},
        net::TcpListener,
    };
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let mut held = Vec::with_capacity(n);
    if ephemeral_low > LOWEST + 1_000 {
        let span = ephemeral_low - LOWEST;
        let random = RandomState::new();
        for attempt in 0..(n as u64 * 50) {
            if held.len() == n {
                break;
            }
            let port = LOWEST + (random.hash_one(attempt) % u64::from(span)) as u32;
            if let Ok(port) = u16::try_from(port)
                && let Ok(listener) = TcpListener::bind(("127.0.0.1", port))
            {
                held.push(listener);
            }
        }
    }
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    }
    held.iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// One port of [`free_ports`].
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

#[cfg(test)]
mod port_tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = super::free_ports(8);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{ports:?}");
        for port in &ports {
            std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
        }
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
            if low > 11_000 {
                assert!(ports.iter().all(|p| *p < low), "{ports:?} not below {low}");
            }
        }
    }
}

#[cfg(test)]
mod nats_tests {
    #![allow(clippy::unwrap_used)]

    use super::TestNats;

    #[test]
    fn a_streams_creation_time_is_read_from_its_name() {
        let id = "01a2278214557340bfe71ce927d8f8f2";
        let at = Some(0x01a2_2782_1455);
        assert_eq!(super::stream_created_ms(&format!("TEST_{id}")), at);
        assert_eq!(
            super::stream_created_ms(&format!("TEST_{}_AUDIT", id.to_uppercase())),
            at
        );
        assert_eq!(super::stream_created_ms(&format!("BENCH_{id}_CACHE")), at);
        for other in [
            "SWITCHBOARD_USAGE",
            "SWITCHBOARD_AUDIT",
            "TEST_short",
            "TEST_01a2278214557340bfe71ce927d8f8f2x",
            "TEST_zza2278214557340bfe71ce927d8f8f2",
        ] {
            assert_eq!(super::stream_created_ms(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn streams_older_than_the_age_are_deleted_and_others_kept() {
        let nats = TestNats::create().await.unwrap();
        let client = async_nats::connect(&nats.url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        // A namespace of two hours ago, and this test's own.
        let old_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            - 2 * 3_600_000;
        let old = format!("TEST_{old_ms:012x}70008000000000000000_AUDIT");
        for (i, name) in [old.clone(), nats.stream.clone()].iter().enumerate() {
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.stale.{i}", nats.prefix)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        super::delete_stale_streams(client, std::time::Duration::from_secs(3_600)).await;
        assert!(js.get_stream(&old).await.is_err(), "{old} kept");
        assert!(js.get_stream(&nats.stream).await.is_ok());
        nats.cleanup().await;
    }

    #[tokio::test]
    async fn cleanup_deletes_the_streams_the_services_derive_from_the_prefix() {
        let nats = TestNats::create().await.unwrap();
        let config = nats.config();
        let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
        // The names the services create: the usage stream, the guard's audit stream and the
        // cache's replication stream (both derived from the prefix, in upper case).
        let made = [
            nats.stream.clone(),
            config.audit_stream(),
            config.cache_stream(),
        ];
        for (i, name) in made.iter().enumerate() {
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.cleanup.{i}", nats.prefix)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        nats.cleanup().await;
        for name in made {
            assert!(js.get_stream(&name).await.is_err(), "{name} left behind");
        }
    }
}
