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

    /// Deletes the test's stream (best effort).
    pub async fn cleanup(&self) {
        if let Ok(client) = async_nats::connect(&self.url).await {
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(&self.stream).await;
        }
    }
}
