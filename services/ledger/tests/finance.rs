//! Finance's interface over gRPC: QuerySpend by every dimension with filters, FindUsageRecords by
//! trace id, the streamed ExportUsage, argument errors with field violations, and the unpriced
//! counter that counts only rows actually inserted.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Duration};

use switchboard_bus::NatsConfig;
use switchboard_ledger::{
    App, Config, StartupError,
    internals::{Repository, Tokens, UsageRow},
};
use switchboard_proto::{
    Timestamp,
    ledger::v1::{
        CacheOutcome, ExportUsageRequest, FindUsageRecordsRequest, QuerySpendRequest,
        QuerySpendResponse, RequestStatus, SpendDimension, SpendGroup, SpendSource, UsageFilter,
        ledger_service_client::LedgerServiceClient,
    },
};
use switchboard_testkit::{TestNats, TestPg};
use time::{OffsetDateTime, macros::datetime};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_types::StatusExt as _;
use uuid::Uuid;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

struct Ledger {
    pg: TestPg,
    nats: TestNats,
    repo: Repository,
    client: LedgerServiceClient<Channel>,
    metrics: Option<std::net::SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl Ledger {
    async fn start(metrics: bool) -> Ledger {
        let pg = TestPg::create().await.expect("postgres");
        let nats = TestNats::create().await.expect("nats");
        let nats_config = nats.config();
        let config = Config {
            grpc_addr: "127.0.0.1:0".into(),
            database_url: pg.url.clone(),
            max_connections: 4,
            metrics_addr: metrics.then(|| "127.0.0.1:0".to_owned()),
            ..Config::default()
        };
        let app = App::build(config, nats_config).await.expect("ledger");
        let addr = app.local_addr();
        let metrics = app.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = LedgerServiceClient::connect(switchboard_grpc::url_of(addr))
            .await
            .expect("client");
        let repo = Repository::connect(&pg.url, 2).await.expect("repo");
        Ledger {
            pg,
            nats,
            repo,
            client,
            metrics,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("join").expect("clean shutdown");
        self.repo.pool().close().await;
        self.nats.cleanup().await;
        self.pg.drop_db().await;
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    time: OffsetDateTime,
    app: &str,
    team: &str,
    key: &str,
    route: &str,
    provider: &str,
    model: &str,
    cost: Option<i64>,
    tags: &[(&str, &str)],
) -> UsageRow {
    UsageRow {
        request_id: Uuid::now_v7(),
        time,
        app: app.into(),
        team: team.into(),
        key_id: key.into(),
        requested_model: route.into(),
        provider: provider.into(),
        model: model.into(),
        attempts: 1,
        tokens: Tokens {
            prompt: 1000,
            cached_prompt: 100,
            cache_write: 0,
            completion: 200,
            reasoning: 20,
        },
        earlier_attempts: None,
        cost_usd_nanos: cost,
        saved_usd_nanos: 0,
        cache: CacheOutcome::Miss,
        status: RequestStatus::Ok,
        error_code: String::new(),
        streamed: false,
        latency_ms: 10,
        trace_id: String::new(),
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Four requests over January and February 2026.
fn seed() -> Vec<UsageRow> {
    let mut r1 = row(
        datetime!(2026-01-05 10:15 UTC),
        "billing",
        "finance",
        "k1",
        "fast",
        "openai",
        "gpt-4o-mini",
        Some(100),
        &[("env", "prod"), ("feature", "invoices")],
    );
    r1.trace_id = TRACE.into();
    let mut r2 = row(
        datetime!(2026-01-05 11:45 UTC),
        "billing",
        "finance",
        "k2",
        "fast",
        "azure",
        "gpt-4o",
        Some(200),
        &[("env", "prod")],
    );
    r2.trace_id = TRACE.into();
    let mut r3 = row(
        datetime!(2026-01-20 08:00 UTC),
        "search",
        "platform",
        "k3",
        "smart",
        "openai",
        "gpt-4o",
        None,
        &[("env", "dev")],
    );
    r3.status = RequestStatus::Error;
    let mut r4 = row(
        datetime!(2026-02-02 09:30 UTC),
        "search",
        "platform",
        "k3",
        "smart",
        "anthropic",
        "claude",
        Some(1_000),
        &[],
    );
    r4.cache = CacheOutcome::Hit;
    r4.saved_usd_nanos = 50;
    vec![r1, r2, r3, r4]
}

fn ts(t: OffsetDateTime) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    })
}

fn by(dimensions: &[SpendDimension]) -> QuerySpendRequest {
    QuerySpendRequest {
        start: ts(datetime!(2026-01-01 00:00 UTC)),
        end: ts(datetime!(2026-03-01 00:00 UTC)),
        group_by: dimensions.iter().map(|d| *d as i32).collect(),
        tag_key: String::new(),
        filter: None,
    }
}

async fn spend(ledger: &mut Ledger, request: QuerySpendRequest) -> QuerySpendResponse {
    ledger
        .client
        .query_spend(request)
        .await
        .expect("query spend")
        .into_inner()
}

/// (key, requests, cost) of each group, the key being `pick` of the group.
fn summary(
    answer: &QuerySpendResponse,
    pick: impl Fn(&SpendGroup) -> String,
) -> Vec<(String, u64, i64)> {
    answer
        .groups
        .iter()
        .map(|g| (pick(g), g.requests, g.cost_usd_nanos))
        .collect()
}

/// A dimension, how to read a group's key, and the expected (key, requests, cost) rows.
type Case = (
    SpendDimension,
    fn(&SpendGroup) -> String,
    Vec<(String, u64, i64)>,
);

fn period(g: &SpendGroup) -> String {
    let p = g.period_start.unwrap();
    OffsetDateTime::from_unix_timestamp(p.seconds)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn spend_by_every_dimension_with_filters_from_the_rollups() {
    let mut ledger = Ledger::start(false).await;
    ledger.repo.insert_batch(&seed()).await.unwrap();
    let s = |v: &str, n: u64, c: i64| (v.to_owned(), n, c);

    let team = spend(&mut ledger, by(&[SpendDimension::Team])).await;
    assert_eq!(
        summary(&team, |g| g.team.clone()),
        vec![s("finance", 2, 300), s("platform", 2, 1_000)]
    );
    // A month-aligned range reads only the daily rollup.
    assert_eq!(team.sources, vec![SpendSource::RollupDaily as i32]);
    let platform = &team.groups[1];
    assert_eq!(
        (
            platform.unpriced_requests,
            platform.error_requests,
            platform.cache_hits,
            platform.saved_usd_nanos
        ),
        (1, 1, 1, 50)
    );
    assert!(platform.app.is_empty() && platform.model.is_empty());
    let total = team.total.unwrap();
    assert_eq!(
        (
            total.requests,
            total.cost_usd_nanos,
            total.prompt_tokens,
            total.cached_prompt_tokens,
            total.reasoning_tokens
        ),
        (4, 1_300, 4_000, 400, 80)
    );

    let cases: Vec<Case> = vec![
        (
            SpendDimension::App,
            |g| g.app.clone(),
            vec![s("billing", 2, 300), s("search", 2, 1_000)],
        ),
        (
            SpendDimension::Key,
            |g| g.key_id.clone(),
            vec![s("k1", 1, 100), s("k2", 1, 200), s("k3", 2, 1_000)],
        ),
        (
            SpendDimension::Model,
            |g| g.model.clone(),
            vec![
                s("claude", 1, 1_000),
                s("gpt-4o", 2, 200),
                s("gpt-4o-mini", 1, 100),
            ],
        ),
        (
            SpendDimension::Provider,
            |g| g.provider.clone(),
            vec![
                s("anthropic", 1, 1_000),
                s("azure", 1, 200),
                s("openai", 2, 100),
            ],
        ),
        (
            SpendDimension::Route,
            |g| g.route.clone(),
            vec![s("fast", 2, 300), s("smart", 2, 1_000)],
        ),
        (
            SpendDimension::Month,
            period,
            vec![
                s("2026-01-01 0:00:00.0 +00:00:00", 3, 300),
                s("2026-02-01 0:00:00.0 +00:00:00", 1, 1_000),
            ],
        ),
        (
            SpendDimension::Day,
            period,
            vec![
                s("2026-01-05 0:00:00.0 +00:00:00", 2, 300),
                s("2026-01-20 0:00:00.0 +00:00:00", 1, 0),
                s("2026-02-02 0:00:00.0 +00:00:00", 1, 1_000),
            ],
        ),
        (
            SpendDimension::Hour,
            period,
            vec![
                s("2026-01-05 10:00:00.0 +00:00:00", 1, 100),
                s("2026-01-05 11:00:00.0 +00:00:00", 1, 200),
                s("2026-01-20 8:00:00.0 +00:00:00", 1, 0),
                s("2026-02-02 9:00:00.0 +00:00:00", 1, 1_000),
            ],
        ),
    ];
    for (dimension, pick, expected) in cases {
        let answer = spend(&mut ledger, by(&[dimension])).await;
        assert_eq!(summary(&answer, pick), expected, "{dimension:?}");
        let expected_source = if dimension == SpendDimension::Hour {
            SpendSource::RollupHourly
        } else {
            SpendSource::RollupDaily
        };
        assert_eq!(
            answer.sources,
            vec![expected_source as i32],
            "{dimension:?}"
        );
    }

    // Two dimensions, in request order.
    let two = spend(
        &mut ledger,
        by(&[SpendDimension::Team, SpendDimension::Model]),
    )
    .await;
    assert_eq!(
        summary(&two, |g| format!("{}/{}", g.team, g.model)),
        vec![
            s("finance/gpt-4o", 1, 200),
            s("finance/gpt-4o-mini", 1, 100),
            s("platform/claude", 1, 1_000),
            s("platform/gpt-4o", 1, 0),
        ]
    );

    // By tag: raw rows; a row without the tag is grouped under "".
    let mut tag = by(&[SpendDimension::Tag]);
    tag.tag_key = "env".into();
    let tagged = spend(&mut ledger, tag).await;
    assert_eq!(
        summary(&tagged, |g| g.tag_value.clone()),
        vec![s("", 1, 1_000), s("dev", 1, 0), s("prod", 2, 300)]
    );
    assert_eq!(tagged.sources, vec![SpendSource::Raw as i32]);

    // Filters.
    let filtered = |filter: UsageFilter| QuerySpendRequest {
        filter: Some(filter),
        ..by(&[SpendDimension::App])
    };
    let billing = spend(
        &mut ledger,
        filtered(UsageFilter {
            apps: vec!["billing".into()],
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        summary(&billing, |g| g.app.clone()),
        vec![s("billing", 2, 300)]
    );
    let openai_or_azure_on_fast = spend(
        &mut ledger,
        filtered(UsageFilter {
            providers: vec!["openai".into(), "azure".into()],
            routes: vec!["fast".into()],
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        summary(&openai_or_azure_on_fast, |g| g.app.clone()),
        vec![s("billing", 2, 300)]
    );
    let by_team_and_key = spend(
        &mut ledger,
        filtered(UsageFilter {
            teams: vec!["platform".into()],
            key_ids: vec!["k3".into()],
            models: vec!["claude".into()],
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        summary(&by_team_and_key, |g| g.app.clone()),
        vec![s("search", 1, 1_000)]
    );
    let prod = spend(
        &mut ledger,
        filtered(UsageFilter {
            tags: [("env".to_owned(), "prod".to_owned())].into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        summary(&prod, |g| g.app.clone()),
        vec![s("billing", 2, 300)]
    );
    assert_eq!(prod.sources, vec![SpendSource::Raw as i32]);

    // An unaligned range: whole hours from the hourly rollup, the partial hour from raw rows.
    let edge = QuerySpendRequest {
        start: ts(datetime!(2026-01-05 10:30 UTC)),
        end: ts(datetime!(2026-01-05 12:00 UTC)),
        ..by(&[])
    };
    let edge = spend(&mut ledger, edge).await;
    assert_eq!(edge.groups.len(), 1);
    assert_eq!(
        (edge.groups[0].requests, edge.groups[0].cost_usd_nanos),
        (1, 200)
    );
    assert_eq!(
        edge.sources,
        vec![SpendSource::RollupHourly as i32, SpendSource::Raw as i32]
    );

    // The old GetSpend answers the same totals from the same rollups.
    let legacy = ledger
        .client
        .get_spend(switchboard_proto::ledger::v1::GetSpendRequest {
            start: ts(datetime!(2026-01-01 00:00 UTC)),
            end: ts(datetime!(2026-03-01 00:00 UTC)),
            app: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(legacy.total_cost_usd_nanos, 1_300);
    assert_eq!(legacy.rows.len(), 4);
    ledger.stop().await;
}

#[tokio::test]
async fn invalid_spend_queries_name_every_bad_field() {
    let mut ledger = Ledger::start(false).await;
    let mut bad = by(&[SpendDimension::App]);
    bad.group_by.push(99);
    bad.group_by.push(SpendDimension::App as i32);
    let status = ledger.client.query_spend(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let violations = status.get_details_bad_request().unwrap().field_violations;
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, vec!["group_by[1]", "group_by[2]"]);
    assert!(violations[0].description.contains("unknown dimension 99"));
    assert_eq!(
        switchboard_status::ErrorCode::from_status(&status),
        switchboard_status::ErrorCode::InvalidArgument
    );

    let mut unspecified = by(&[SpendDimension::Unspecified, SpendDimension::Tag]);
    unspecified.end = None;
    let status = ledger.client.query_spend(unspecified).await.unwrap_err();
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, vec!["end", "group_by[0]", "tag_key"]);

    let status = ledger
        .client
        .find_usage_records(FindUsageRecordsRequest {
            request_id: String::new(),
            trace_id: "not-a-trace".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "trace_id"
    );
    let status = ledger
        .client
        .export_usage(ExportUsageRequest {
            start: ts(datetime!(2026-01-01 00:00 UTC)),
            end: ts(datetime!(2026-03-01 00:00 UTC)),
            filter: None,
            page_size: 1_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "page_size"
    );
    ledger.stop().await;
}

#[tokio::test]
async fn usage_rows_by_trace_id_and_request_id() {
    let mut ledger = Ledger::start(false).await;
    let rows = seed();
    ledger.repo.insert_batch(&rows).await.unwrap();
    let found = ledger
        .client
        .find_usage_records(FindUsageRecordsRequest {
            request_id: String::new(),
            trace_id: TRACE.to_uppercase(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let ids: Vec<String> = found.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(
        ids,
        vec![
            rows[0].request_id.to_string(),
            rows[1].request_id.to_string()
        ]
    );
    assert_eq!(
        found[0].tags.get("feature").map(String::as_str),
        Some("invoices")
    );
    assert_eq!(found[0].reasoning_tokens, 20);
    let one = ledger
        .client
        .find_usage_records(FindUsageRecordsRequest {
            request_id: rows[2].request_id.to_string(),
            trace_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].cost_usd_nanos, None);
    let none = ledger
        .client
        .find_usage_records(FindUsageRecordsRequest {
            request_id: String::new(),
            trace_id: "00000000000000000000000000000001".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(none.is_empty());
    ledger.stop().await;
}

#[tokio::test]
async fn export_streams_every_row_in_order_across_pages() {
    let mut ledger = Ledger::start(false).await;
    let mut rows = Vec::new();
    for i in 0..25i64 {
        // Pairs of rows share a time: the keyset must break ties by request id.
        let time = datetime!(2026-01-31 23:00 UTC) + time::Duration::minutes(i / 2 * 7);
        let app = if i % 5 == 0 { "search" } else { "billing" };
        rows.push(row(time, app, "t", "k", "r", "p", "m", Some(i), &[]));
    }
    ledger.repo.insert_batch(&rows).await.unwrap();
    let request = |page_size: u32, apps: Vec<String>| ExportUsageRequest {
        start: ts(datetime!(2026-01-01 00:00 UTC)),
        end: ts(datetime!(2026-03-01 00:00 UTC)),
        filter: Some(UsageFilter {
            apps,
            ..Default::default()
        }),
        page_size,
    };
    let mut stream = ledger
        .client
        .export_usage(request(10, vec![]))
        .await
        .unwrap()
        .into_inner();
    let mut pages = Vec::new();
    let mut exported = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        pages.push(page.records.len());
        exported.extend(page.records);
    }
    assert_eq!(pages, vec![10, 10, 5]);
    let mut expected: Vec<(i64, String)> = rows
        .iter()
        .map(|r| (r.time.unix_timestamp(), r.request_id.to_string()))
        .collect();
    expected.sort();
    let got: Vec<(i64, String)> = exported
        .iter()
        .map(|r| (r.time.unwrap().seconds, r.request_id.clone()))
        .collect();
    assert_eq!(got, expected);

    // Filtered, and a page size that divides the rows exactly (the last page is empty: no message).
    let mut stream = ledger
        .client
        .export_usage(request(5, vec!["search".into()]))
        .await
        .unwrap()
        .into_inner();
    let mut search = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        assert!(!page.records.is_empty());
        search.extend(page.records);
    }
    assert_eq!(search.len(), 5);
    assert!(search.iter().all(|r| r.app == "search"));
    ledger.stop().await;
}

#[tokio::test]
async fn a_redelivered_row_is_not_counted_again_as_unpriced() {
    let ledger = Ledger::start(true).await;
    // The row is already recorded (an earlier delivery whose ack was lost) ...
    let id = Uuid::now_v7();
    let event = switchboard_bus::UsageEvent {
        request_id: id.to_string(),
        time: ts(datetime!(2026-01-05 10:15 UTC)),
        app: "billing".into(),
        route: Some(switchboard_proto::chat::v1::RouteInfo {
            provider: "openai".into(),
            model: "mystery".into(),
            ..Default::default()
        }),
        usage: Some(switchboard_proto::chat::v1::Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            ..Default::default()
        }),
        status: RequestStatus::Ok as i32,
        ..Default::default()
    };
    let book = ledger.repo.load_prices().await.unwrap();
    let row =
        switchboard_ledger::internals::price_event(event.clone(), OffsetDateTime::now_utc(), &book)
            .unwrap();
    assert_eq!(row.cost_usd_nanos, None);
    ledger.repo.insert_batch(&[row]).await.unwrap();
    // ... and JetStream delivers it again, then a new unpriced event.
    let js = async_nats::jetstream::new(async_nats::connect(&ledger.nats.url).await.unwrap());
    let nats_config = NatsConfig {
        url: ledger.nats.url.clone(),
        subject_prefix: ledger.nats.prefix.clone(),
        usage_stream: ledger.nats.stream.clone(),
        ..Default::default()
    };
    let mut fresh = event.clone();
    fresh.request_id = Uuid::now_v7().to_string();
    for e in [&event, &fresh] {
        switchboard_bus::publish_usage(&js, &nats_config, e)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let repo = ledger.repo.clone();
    let fresh_id = Uuid::parse_str(&fresh.request_id).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while repo.get(fresh_id).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fresh row not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The counters are bumped just after the commit that made the row visible: wait until the
    // fresh row is counted, then give a wrongly counted redelivery time to show as well.
    let metrics_addr = ledger.metrics.unwrap();
    while http_get(metrics_addr)
        .await
        .contains("switchboard_ledger_rows_recorded_total 0\n")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fresh row not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = http_get(metrics_addr).await;
    assert!(
        metrics.contains(
            "switchboard_ledger_unpriced_rows_total{provider=\"openai\",model=\"mystery\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchboard_ledger_rows_recorded_total 1\n"),
        "{metrics}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(ledger.repo.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2);
    ledger.stop().await;
}

/// GET /metrics with a bare HTTP/1.0 request.
async fn http_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: ledger\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}
