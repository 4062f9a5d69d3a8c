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
    /// A fresh namespace; checks the server is reachable.
    pub async fn create() -> anyhow::Result<Self> {
        let url = nats_url();
        let id = uuid::Uuid::now_v7().simple().to_string();
        async_nats::connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("NATS at {url} is not reachable (CI starts it): {e}"))?;
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

    /// Deletes the test's streams (best effort): the usage stream and the ones the services
    /// derive from its name (`<stream>_AUDIT`, the guard's audit events; `<stream>_CACHE`, the
    /// cache's replication log).
    pub async fn cleanup(&self) {
        if let Ok(client) = async_nats::connect(&self.url).await {
            let js = async_nats::jetstream::new(client);
            for suffix in ["", "_AUDIT", "_CACHE"] {
                let _ = js.delete_stream(format!("{}{suffix}", self.stream)).await;
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
