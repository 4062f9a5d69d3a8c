//! Finance commands over the ledger's gRPC API (`LedgerService`): `switchboard spend` (spend
//! grouped by any dimension, read from the rollups) and `switchboard usage export` (every usage
//! row of a period, streamed page by page). Money is printed as exact decimal US dollars (from
//! integer nano-USD, never a float) next to the nano-USD integer.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};
use switchboard_config::Source;
use switchboard_proto::{
    Timestamp,
    ledger::v1::{
        ExportUsageRequest, QuerySpendRequest, SpendDimension, SpendGroup, UsageFilter,
        UsageRecord, ledger_service_client::LedgerServiceClient,
    },
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Where the ledger is, the period and the filters (shared by `spend` and `usage export`).
#[derive(Args, Debug, Clone)]
pub struct Scope {
    /// Inclusive start: RFC 3339 time or YYYY-MM-DD (midnight UTC).
    #[arg(long)]
    since: String,
    /// Exclusive end: RFC 3339 time or YYYY-MM-DD (midnight UTC); default now.
    #[arg(long)]
    until: Option<String>,
    /// Only these apps (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    app: Vec<String>,
    /// Only these teams.
    #[arg(long, value_delimiter = ',')]
    team: Vec<String>,
    /// Only these virtual key ids.
    #[arg(long, value_delimiter = ',')]
    key: Vec<String>,
    /// Only these served models.
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// Only these served providers.
    #[arg(long, value_delimiter = ',')]
    provider: Vec<String>,
    /// Only these routes (requested models).
    #[arg(long, value_delimiter = ',')]
    route: Vec<String>,
    /// Only requests with this tag, `key=value` (repeatable; reads raw rows).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Ledger gRPC URL (default: `http://` + `[ledger] grpc_addr` of the configuration).
    #[arg(long)]
    ledger: Option<String>,
    /// Configuration file (default: $SWITCHBOARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Output of `spend`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendFormat {
    /// Aligned columns with a total line.
    Table,
    /// RFC 4180 CSV with a header.
    Csv,
    /// One JSON document: groups and total.
    Json,
}

/// Output of `usage export`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// `switchboard spend`.
#[derive(Args, Debug)]
pub struct SpendArgs {
    /// Group by, comma-separated: app, team, key, model, provider, route, hour, day, month,
    /// tag:<name>. None: one total.
    #[arg(long, value_delimiter = ',')]
    by: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: SpendFormat,
    #[command(flatten)]
    scope: Scope,
}

/// `switchboard usage …`.
#[derive(Subcommand, Debug)]
pub enum UsageCommand {
    /// Every usage row of a period matching the filters, in (time, request id) order.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// Rows per page fetched from the ledger.
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
        #[command(flatten)]
        scope: Scope,
    },
}

type Failure = (u8, String);

fn usage_error(message: impl Into<String>) -> Failure {
    (64, message.into())
}

fn print_failure(command: &str, (code, message): Failure) -> ExitCode {
    eprintln!("switchboard {command}: {message}");
    ExitCode::from(code)
}

/// Runs `switchboard spend`; exit 64 for bad arguments, 69 when the ledger is unreachable, 1 when it refuses.
pub async fn run_spend(args: SpendArgs) -> ExitCode {
    match spend(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => print_failure("spend", failure),
    }
}

/// Runs `switchboard usage …`.
pub async fn run_usage(command: UsageCommand) -> ExitCode {
    match usage(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => print_failure("usage export", failure),
    }
}

fn instant(field: &'static str, text: &str) -> Result<OffsetDateTime, Failure> {
    switchboard_ledger::prices::parse_instant(field, text)
        .map_err(|e| usage_error(format!("--{field}: {e}")))
}

fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// The period, the filter and a connected client.
struct Resolved {
    start: Timestamp,
    end: Timestamp,
    filter: UsageFilter,
    client: LedgerServiceClient<tonic::transport::Channel>,
}

async fn resolve(scope: Scope) -> Result<Resolved, Failure> {
    let start = instant("since", &scope.since)?;
    let end = match &scope.until {
        Some(text) => instant("until", text)?,
        None => OffsetDateTime::now_utc(),
    };
    if start >= end {
        return Err(usage_error("--until must be after --since"));
    }
    let mut tags = std::collections::HashMap::new();
    for tag in &scope.tags {
        let Some((key, value)) = tag.split_once('=') else {
            return Err(usage_error(format!("--tag {tag:?}: expected key=value")));
        };
        tags.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    let url = match scope.ledger {
        Some(url) => url,
        None => {
            let config = Source::load(scope.config.as_deref())
                .and_then(|source| source.section::<switchboard_ledger::Config>("ledger"))
                .map_err(|e| usage_error(format!("invalid configuration: {e}")))?;
            format!("http://{}", config.grpc_addr)
        }
    };
    let client = LedgerServiceClient::connect(url.clone())
        .await
        .map_err(|e| (69, format!("cannot reach the ledger at {url}: {e}")))?;
    let clean = |values: Vec<String>| -> Vec<String> {
        values
            .into_iter()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    };
    Ok(Resolved {
        start: timestamp(start),
        end: timestamp(end),
        filter: UsageFilter {
            apps: clean(scope.app),
            teams: clean(scope.team),
            key_ids: clean(scope.key),
            models: clean(scope.model),
            providers: clean(scope.provider),
            routes: clean(scope.route),
            tags,
        },
        client,
    })
}

fn refused(status: &tonic::Status) -> Failure {
    let mut message = format!("the ledger refused: {}", status.message());
    if let Ok(details) = tonic_types::StatusExt::check_error_details(status)
        && let Some(bad) = details.bad_request()
    {
        for violation in &bad.field_violations {
            message.push_str(&format!(
                "\n  {}: {}",
                violation.field, violation.description
            ));
        }
    }
    let code = if status.code() == tonic::Code::InvalidArgument {
        64
    } else if status.code() == tonic::Code::Unavailable {
        69
    } else {
        1
    };
    (code, message)
}

/// A column of the spend output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    App,
    Team,
    Key,
    Model,
    Provider,
    Route,
    Tag,
    Period,
}

fn parse_by(by: &[String]) -> Result<(Vec<SpendDimension>, Vec<Column>, String), Failure> {
    let mut dimensions = Vec::new();
    let mut columns = Vec::new();
    let mut tag_key = String::new();
    for name in by.iter().map(|b| b.trim()).filter(|b| !b.is_empty()) {
        let (dimension, column) = match name {
            "app" => (SpendDimension::App, Column::App),
            "team" => (SpendDimension::Team, Column::Team),
            "key" => (SpendDimension::Key, Column::Key),
            "model" => (SpendDimension::Model, Column::Model),
            "provider" => (SpendDimension::Provider, Column::Provider),
            "route" => (SpendDimension::Route, Column::Route),
            "hour" => (SpendDimension::Hour, Column::Period),
            "day" => (SpendDimension::Day, Column::Period),
            "month" => (SpendDimension::Month, Column::Period),
            other => match other.strip_prefix("tag:") {
                Some(key) if !key.is_empty() => {
                    tag_key = key.to_owned();
                    (SpendDimension::Tag, Column::Tag)
                }
                _ => {
                    return Err(usage_error(format!(
                        "--by {other:?}: use app, team, key, model, provider, route, hour, day, month or tag:<name>"
                    )));
                }
            },
        };
        dimensions.push(dimension);
        columns.push(column);
    }
    Ok((dimensions, columns, tag_key))
}

/// Exact decimal US dollars of an integer nano-USD amount.
pub fn usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = i128::from(nanos).abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

/// RFC 3339 in UTC, with the fraction of a second when it is not zero (`2026-11-01T09:00:00Z`,
/// `2026-11-01T09:00:00.123456Z`): a row's time is part of its key, so it is shown exactly.
fn time_text(ts: Option<&Timestamp>) -> String {
    ts.and_then(|t| {
        let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
        OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
    })
    .and_then(|t| t.format(&Rfc3339).ok())
    .unwrap_or_default()
}

fn key_of(group: &SpendGroup, column: Column) -> String {
    match column {
        Column::App => group.app.clone(),
        Column::Team => group.team.clone(),
        Column::Key => group.key_id.clone(),
        Column::Model => group.model.clone(),
        Column::Provider => group.provider.clone(),
        Column::Route => group.route.clone(),
        Column::Tag => group.tag_value.clone(),
        Column::Period => time_text(group.period_start.as_ref()),
    }
}

fn header_of(column: Column, by: &[String], index: usize) -> String {
    match column {
        Column::App => "app".into(),
        Column::Team => "team".into(),
        Column::Key => "key".into(),
        Column::Model => "model".into(),
        Column::Provider => "provider".into(),
        Column::Route => "route".into(),
        Column::Tag | Column::Period => by
            .iter()
            .map(|b| b.trim())
            .filter(|b| !b.is_empty())
            .nth(index)
            .unwrap_or("period")
            .to_owned(),
    }
}

const MEASURES: [&str; 10] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cost_usd_nanos",
    "unpriced_requests",
    "saved_usd",
    "saved_usd_nanos",
    "error_requests",
    "cache_hits",
];

fn measures_of(group: &SpendGroup) -> Vec<String> {
    vec![
        group.requests.to_string(),
        group.prompt_tokens.to_string(),
        group.completion_tokens.to_string(),
        usd(group.cost_usd_nanos),
        group.cost_usd_nanos.to_string(),
        group.unpriced_requests.to_string(),
        usd(group.saved_usd_nanos),
        group.saved_usd_nanos.to_string(),
        group.error_requests.to_string(),
        group.cache_hits.to_string(),
    ]
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

fn csv_line(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
}

async fn spend(args: SpendArgs) -> Result<(), Failure> {
    let (dimensions, columns, tag_key) = parse_by(&args.by)?;
    let mut resolved = resolve(args.scope).await?;
    let answer = resolved
        .client
        .query_spend(QuerySpendRequest {
            start: Some(resolved.start),
            end: Some(resolved.end),
            group_by: dimensions.iter().map(|d| *d as i32).collect(),
            tag_key,
            filter: Some(resolved.filter),
        })
        .await
        .map_err(|status| refused(&status))?
        .into_inner();
    let total = answer.total.unwrap_or_default();
    let headers: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| header_of(*c, &args.by, i))
        .chain(MEASURES.iter().map(|m| (*m).to_owned()))
        .collect();
    let rows: Vec<Vec<String>> = answer
        .groups
        .iter()
        .map(|g| {
            columns
                .iter()
                .map(|c| key_of(g, *c))
                .chain(measures_of(g))
                .collect()
        })
        .collect();
    let mut out = String::new();
    match args.format {
        SpendFormat::Csv => {
            out.push_str(&csv_line(&headers));
            out.push('\n');
            for row in &rows {
                out.push_str(&csv_line(row));
                out.push('\n');
            }
        }
        SpendFormat::Json => {
            let object = |keys: Vec<(String, String)>, group: &SpendGroup| {
                let mut map = serde_json::Map::new();
                for (k, v) in keys {
                    map.insert(k, serde_json::Value::String(v));
                }
                map.insert("requests".into(), group.requests.into());
                map.insert("prompt_tokens".into(), group.prompt_tokens.into());
                map.insert("completion_tokens".into(), group.completion_tokens.into());
                map.insert(
                    "cached_prompt_tokens".into(),
                    group.cached_prompt_tokens.into(),
                );
                map.insert("cache_write_tokens".into(), group.cache_write_tokens.into());
                map.insert("reasoning_tokens".into(), group.reasoning_tokens.into());
                // Exact decimal as a string (a JSON number would invite float parsing).
                map.insert("cost_usd".into(), usd(group.cost_usd_nanos).into());
                map.insert("cost_usd_nanos".into(), group.cost_usd_nanos.into());
                map.insert("unpriced_requests".into(), group.unpriced_requests.into());
                map.insert("saved_usd".into(), usd(group.saved_usd_nanos).into());
                map.insert("saved_usd_nanos".into(), group.saved_usd_nanos.into());
                map.insert("error_requests".into(), group.error_requests.into());
                map.insert("cache_hits".into(), group.cache_hits.into());
                serde_json::Value::Object(map)
            };
            let groups: Vec<serde_json::Value> = answer
                .groups
                .iter()
                .map(|g| {
                    let keys = columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (header_of(*c, &args.by, i), key_of(g, *c)))
                        .collect();
                    object(keys, g)
                })
                .collect();
            let document = serde_json::json!({
                "since": time_text(Some(&resolved.start)),
                "until": time_text(Some(&resolved.end)),
                "groups": groups,
                "total": object(Vec::new(), &total),
            });
            out.push_str(&serde_json::to_string_pretty(&document).unwrap_or_default());
            out.push('\n');
        }
        SpendFormat::Table => {
            let mut all = vec![headers.clone()];
            all.extend(rows.iter().cloned());
            let mut total_row: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    if i == 0 {
                        "TOTAL".to_owned()
                    } else {
                        String::new()
                    }
                })
                .collect();
            total_row.extend(measures_of(&total));
            if columns.is_empty() {
                total_row = measures_of(&total);
            }
            all.push(total_row);
            let widths: Vec<usize> = (0..headers.len())
                .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                .collect();
            for (n, row) in all.iter().enumerate() {
                if n == all.len() - 1 && !rows.is_empty() {
                    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                    out.push_str(rule.join("  ").trim_end());
                    out.push('\n');
                }
                let cells: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(i, cell)| {
                        if i < columns.len() {
                            format!("{cell:<width$}", width = widths[i])
                        } else {
                            format!("{cell:>width$}", width = widths[i])
                        }
                    })
                    .collect();
                out.push_str(cells.join("  ").trim_end());
                out.push('\n');
            }
        }
    }
    print!("{out}");
    Ok(())
}

const EXPORT_COLUMNS: [&str; 24] = [
    "request_id",
    "time",
    "app",
    "team",
    "key_id",
    "route",
    "provider",
    "model",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cost_usd_nanos",
    "saved_usd_nanos",
    "cache",
    "status",
    "error_code",
    "streamed",
    "latency_ms",
    "trace_id",
    "tags",
];

fn cache_name(value: i32) -> &'static str {
    match value {
        1 => "miss",
        2 => "hit",
        3 => "bypass",
        _ => "unspecified",
    }
}

fn status_name(value: i32) -> &'static str {
    match value {
        1 => "ok",
        2 => "error",
        3 => "partial",
        _ => "unspecified",
    }
}

fn export_fields(record: &UsageRecord) -> Vec<String> {
    let tags: std::collections::BTreeMap<&String, &String> = record.tags.iter().collect();
    vec![
        record.request_id.clone(),
        time_text(record.time.as_ref()),
        record.app.clone(),
        record.team.clone(),
        record.key_id.clone(),
        record.requested_model.clone(),
        record.provider.clone(),
        record.model.clone(),
        record.attempts.to_string(),
        record.prompt_tokens.to_string(),
        record.completion_tokens.to_string(),
        record.cached_prompt_tokens.to_string(),
        record.cache_write_tokens.to_string(),
        record.reasoning_tokens.to_string(),
        record.cost_usd_nanos.map(usd).unwrap_or_default(),
        record
            .cost_usd_nanos
            .map(|c| c.to_string())
            .unwrap_or_default(),
        record.saved_usd_nanos.to_string(),
        cache_name(record.cache).to_owned(),
        status_name(record.status).to_owned(),
        record.error_code.clone(),
        record.streamed.to_string(),
        record.latency_ms.to_string(),
        record.trace_id.clone(),
        serde_json::to_string(&tags).unwrap_or_default(),
    ]
}

fn export_json(record: &UsageRecord) -> serde_json::Value {
    let tags: std::collections::BTreeMap<&String, &String> = record.tags.iter().collect();
    serde_json::json!({
        "request_id": record.request_id,
        "time": time_text(record.time.as_ref()),
        "app": record.app,
        "team": record.team,
        "key_id": record.key_id,
        "route": record.requested_model,
        "provider": record.provider,
        "model": record.model,
        "attempts": record.attempts,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_prompt_tokens": record.cached_prompt_tokens,
        "cache_write_tokens": record.cache_write_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "cost_usd": record.cost_usd_nanos.map(usd),
        "cost_usd_nanos": record.cost_usd_nanos,
        "saved_usd_nanos": record.saved_usd_nanos,
        "cache": cache_name(record.cache),
        "status": status_name(record.status),
        "error_code": record.error_code,
        "streamed": record.streamed,
        "latency_ms": record.latency_ms,
        "trace_id": record.trace_id,
        "tags": tags,
    })
}

async fn usage(command: UsageCommand) -> Result<(), Failure> {
    let UsageCommand::Export {
        format,
        page_size,
        scope,
    } = command;
    let mut resolved = resolve(scope).await?;
    let mut pages = resolved
        .client
        .export_usage(ExportUsageRequest {
            start: Some(resolved.start),
            end: Some(resolved.end),
            filter: Some(resolved.filter),
            page_size,
        })
        .await
        .map_err(|status| refused(&status))?
        .into_inner();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let write_error = |e: std::io::Error| (74, format!("cannot write the export: {e}"));
    if format == ExportFormat::Csv {
        let header: Vec<String> = EXPORT_COLUMNS.iter().map(|c| (*c).to_owned()).collect();
        writeln!(out, "{}", csv_line(&header)).map_err(write_error)?;
    }
    while let Some(page) = pages.message().await.map_err(|status| refused(&status))? {
        for record in &page.records {
            match format {
                ExportFormat::Csv => writeln!(out, "{}", csv_line(&export_fields(record))),
                ExportFormat::Jsonl => writeln!(out, "{}", export_json(record)),
            }
            .map_err(write_error)?;
        }
        out.flush().map_err(write_error)?;
    }
    out.flush().map_err(write_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_their_fraction_of_a_second() {
        let at = |seconds: i64, nanos: i32| time_text(Some(&Timestamp { seconds, nanos }));
        // 2026-11-01T09:00:00Z
        let nine = 1_793_523_600;
        assert_eq!(at(nine, 0), "2026-11-01T09:00:00Z");
        assert_eq!(at(nine, 123_456_000), "2026-11-01T09:00:00.123456Z");
        assert_eq!(at(nine, 1), "2026-11-01T09:00:00.000000001Z");
        assert_eq!(at(nine, 999_999_999), "2026-11-01T09:00:00.999999999Z");
        assert_eq!(time_text(None), "");
    }

    #[test]
    fn usd_is_exact() {
        assert_eq!(usd(0), "0.000000000");
        assert_eq!(usd(1_234_567_891), "1.234567891");
        assert_eq!(usd(-5), "-0.000000005");
        assert_eq!(usd(i64::MIN), "-9223372036.854775808");
    }

    #[test]
    fn by_parses_every_dimension_and_refuses_others() {
        let by = |text: &str| parse_by(&text.split(',').map(str::to_owned).collect::<Vec<_>>());
        let (dimensions, _, tag) = by("team,model,tag:env,month").unwrap();
        assert_eq!(
            dimensions,
            vec![
                SpendDimension::Team,
                SpendDimension::Model,
                SpendDimension::Tag,
                SpendDimension::Month
            ]
        );
        assert_eq!(tag, "env");
        assert_eq!(by("teams").unwrap_err().0, 64);
        assert_eq!(by("tag:").unwrap_err().0, 64);
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(
            csv_line(&["a".into(), "b,c".into(), "say \"hi\"".into()]),
            "a,\"b,c\",\"say \"\"hi\"\"\""
        );
    }
}
