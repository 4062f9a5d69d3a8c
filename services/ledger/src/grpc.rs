//! gRPC handlers: convert protobuf <-> domain and map errors.

use futures::StreamExt as _;
use switchboard_proto::ledger::v1::{
    ExportUsageRequest, ExportUsageResponse, FindUsageRecordsRequest, FindUsageRecordsResponse,
    GetSpendRequest, GetSpendResponse, GetUsageRecordRequest, GetUsageRecordResponse,
    ListUnpricedRequest, ListUnpricedResponse, QuerySpendRequest, QuerySpendResponse,
    SpendDimension, SpendGroup, SpendRow, SpendSource, UnpricedModel, UsageFilter, UsageRecord,
    ledger_service_server::LedgerService,
};
use switchboard_status::to_status;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    error::{DOMAIN, LedgerError},
    record::{UsageRow, time_to_timestamp, timestamp_to_time},
    repo::{RepoError, Repository},
    spend::{Dimension, Filter, Group, Measures, Source, SpendQuery},
};

/// Export page size when the request sets none, and the largest allowed.
const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 10_000;

/// The `LedgerService` implementation.
#[derive(Debug, Clone)]
pub struct LedgerApi {
    repo: Repository,
}

impl LedgerApi {
    /// A service over `repo`.
    pub fn new(repo: Repository) -> Self {
        LedgerApi { repo }
    }
}

fn time_field(
    field: &'static str,
    value: Option<&switchboard_proto::Timestamp>,
) -> Result<time::OffsetDateTime, LedgerError> {
    let value = value.ok_or(LedgerError::InvalidArgument {
        field,
        message: "required".to_owned(),
    })?;
    timestamp_to_time(value).ok_or(LedgerError::InvalidArgument {
        field,
        message: "out of range".to_owned(),
    })
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn record_of(row: UsageRow) -> UsageRecord {
    UsageRecord {
        request_id: row.request_id.to_string(),
        time: Some(time_to_timestamp(row.time)),
        app: row.app,
        team: row.team,
        key_id: row.key_id,
        requested_model: row.requested_model,
        provider: row.provider,
        model: row.model,
        attempts: row.attempts,
        prompt_tokens: row.tokens.prompt,
        completion_tokens: row.tokens.completion,
        cached_prompt_tokens: row.tokens.cached_prompt,
        cost_usd_nanos: row.cost_usd_nanos,
        saved_usd_nanos: row.saved_usd_nanos,
        cache: row.cache as i32,
        status: row.status as i32,
        streamed: row.streamed,
        trace_id: row.trace_id,
        error_code: row.error_code,
        cache_write_tokens: row.tokens.cache_write,
        reasoning_tokens: row.tokens.reasoning,
        latency_ms: row.latency_ms,
        tags: row.tags.into_iter().collect(),
    }
}

fn time_range(
    start: Option<&switchboard_proto::Timestamp>,
    end: Option<&switchboard_proto::Timestamp>,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), LedgerError> {
    let start = time_field("start", start)?;
    let end = time_field("end", end)?;
    if start >= end {
        return Err(LedgerError::InvalidArgument {
            field: "end",
            message: "must be after start".to_owned(),
        });
    }
    Ok((start, end))
}

fn filter_of(filter: Option<UsageFilter>) -> Filter {
    let filter = filter.unwrap_or_default();
    Filter {
        apps: filter.apps,
        teams: filter.teams,
        key_ids: filter.key_ids,
        models: filter.models,
        providers: filter.providers,
        routes: filter.routes,
        tags: filter.tags.into_iter().collect(),
    }
}

fn dimension_of(value: i32) -> Option<Dimension> {
    Some(match SpendDimension::try_from(value).ok()? {
        SpendDimension::Unspecified => return None,
        SpendDimension::App => Dimension::App,
        SpendDimension::Team => Dimension::Team,
        SpendDimension::Key => Dimension::Key,
        SpendDimension::Model => Dimension::Model,
        SpendDimension::Provider => Dimension::Provider,
        SpendDimension::Route => Dimension::Route,
        SpendDimension::Tag => Dimension::Tag,
        SpendDimension::Hour => Dimension::Hour,
        SpendDimension::Day => Dimension::Day,
        SpendDimension::Month => Dimension::Month,
    })
}

/// Checks a spend query; every invalid field is reported (google.rpc.BadRequest).
fn spend_query_of(request: QuerySpendRequest) -> Result<SpendQuery, LedgerError> {
    let mut violations: Vec<(String, String)> = Vec::new();
    let range = time_range(request.start.as_ref(), request.end.as_ref());
    if let Err(LedgerError::InvalidArgument { field, message }) = &range {
        violations.push(((*field).to_owned(), message.clone()));
    }
    let mut group_by = Vec::with_capacity(request.group_by.len());
    let mut periods = 0;
    for (i, value) in request.group_by.iter().enumerate() {
        match dimension_of(*value) {
            None => violations.push((
                format!("group_by[{i}]"),
                format!("unknown dimension {value}: use one of app, team, key, model, provider, route, tag, hour, day, month"),
            )),
            Some(dimension) if group_by.contains(&dimension) => {
                violations.push((format!("group_by[{i}]"), "repeated dimension".to_owned()));
            }
            Some(dimension) => {
                if matches!(dimension, Dimension::Hour | Dimension::Day | Dimension::Month) {
                    periods += 1;
                    if periods > 1 {
                        violations.push((
                            format!("group_by[{i}]"),
                            "at most one of hour, day and month".to_owned(),
                        ));
                    }
                }
                group_by.push(dimension);
            }
        }
    }
    let tag_key = Some(request.tag_key.trim().to_owned()).filter(|k| !k.is_empty());
    match (group_by.contains(&Dimension::Tag), &tag_key) {
        (true, None) => violations.push((
            "tag_key".to_owned(),
            "required when grouping by SPEND_DIMENSION_TAG".to_owned(),
        )),
        (false, Some(_)) => violations.push((
            "tag_key".to_owned(),
            "only used with SPEND_DIMENSION_TAG in group_by".to_owned(),
        )),
        _ => {}
    }
    match range {
        Ok((start, end)) if violations.is_empty() => Ok(SpendQuery {
            start,
            end,
            group_by,
            tag_key,
            filter: filter_of(request.filter),
        }),
        _ => Err(LedgerError::InvalidFields(violations)),
    }
}

fn group_of(group: Group) -> SpendGroup {
    let Measures {
        requests,
        prompt_tokens,
        completion_tokens,
        cached_prompt_tokens,
        cache_write_tokens,
        reasoning_tokens,
        cost_usd_nanos,
        unpriced_requests,
        saved_usd_nanos,
        error_requests,
        cache_hits,
    } = group.measures;
    SpendGroup {
        app: group.app.unwrap_or_default(),
        team: group.team.unwrap_or_default(),
        key_id: group.key_id.unwrap_or_default(),
        model: group.model.unwrap_or_default(),
        provider: group.provider.unwrap_or_default(),
        route: group.route.unwrap_or_default(),
        tag_value: group.tag_value.unwrap_or_default(),
        period_start: group.period_start.map(time_to_timestamp),
        requests: to_u64(requests),
        prompt_tokens: to_u64(prompt_tokens),
        completion_tokens: to_u64(completion_tokens),
        cached_prompt_tokens: to_u64(cached_prompt_tokens),
        cache_write_tokens: to_u64(cache_write_tokens),
        reasoning_tokens: to_u64(reasoning_tokens),
        cost_usd_nanos,
        unpriced_requests: to_u64(unpriced_requests),
        saved_usd_nanos,
        error_requests: to_u64(error_requests),
        cache_hits: to_u64(cache_hits),
    }
}

fn is_trace_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where an export stands between pages.
enum Cursor {
    Next(Option<(time::OffsetDateTime, Uuid)>),
    Done,
}

impl LedgerApi {
    /// `ListUnpriced`: the (provider, model) pairs that lack a price among the unpriced rows of
    /// the period, each with the rows that used it (see [`crate::unpriced`]).
    async fn unpriced(
        &self,
        request: ListUnpricedRequest,
    ) -> Result<ListUnpricedResponse, LedgerError> {
        let (start, end) = time_range(request.start.as_ref(), request.end.as_ref())?;
        let app = Some(request.app.as_str()).filter(|app| !app.is_empty());
        // The prices recorded now, as `switchboard prices reprice` reads them: a pair listed here is
        // one that a re-pricing would still find without a price.
        let prices = self.repo.load_prices().await.map_err(|error| match error {
            RepoError::Database(error) => LedgerError::from(error),
            other => LedgerError::Internal(other.to_string()),
        })?;
        let models = self
            .repo
            .unpriced(start, end, app, &prices)
            .await?
            .into_iter()
            .map(|u| UnpricedModel {
                provider: u.provider,
                model: u.model,
                requests: to_u64(u.requests),
                prompt_tokens: to_u64(u.prompt_tokens),
                completion_tokens: to_u64(u.completion_tokens),
                first_seen: Some(time_to_timestamp(u.first_seen)),
                last_seen: Some(time_to_timestamp(u.last_seen)),
            })
            .collect();
        Ok(ListUnpricedResponse { models })
    }

    async fn spend(&self, request: GetSpendRequest) -> Result<GetSpendResponse, LedgerError> {
        let (start, end) = time_range(request.start.as_ref(), request.end.as_ref())?;
        let app = Some(request.app.as_str()).filter(|app| !app.is_empty());
        let spend = self.repo.spend(start, end, app).await?;
        let total: i128 = spend.iter().map(|s| i128::from(s.cost_usd_nanos)).sum();
        let total_cost_usd_nanos = i64::try_from(total)
            .map_err(|_| LedgerError::Internal("total cost overflows 64 bits".to_owned()))?;
        let rows = spend
            .into_iter()
            .map(|s| SpendRow {
                app: s.app,
                model: s.model,
                requests: to_u64(s.requests),
                prompt_tokens: to_u64(s.prompt_tokens),
                completion_tokens: to_u64(s.completion_tokens),
                cost_usd_nanos: s.cost_usd_nanos,
                saved_usd_nanos: s.saved_usd_nanos,
                cache_hits: to_u64(s.cache_hits),
                unpriced_requests: to_u64(s.unpriced_requests),
            })
            .collect();
        Ok(GetSpendResponse {
            rows,
            total_cost_usd_nanos,
        })
    }

    async fn query_spend(
        &self,
        request: QuerySpendRequest,
    ) -> Result<QuerySpendResponse, LedgerError> {
        let query = spend_query_of(request)?;
        let answer = crate::spend::query(self.repo.pool(), &query).await?;
        Ok(QuerySpendResponse {
            groups: answer.groups.into_iter().map(group_of).collect(),
            total: Some(group_of(Group {
                measures: answer.total,
                ..Group::default()
            })),
            sources: answer
                .sources
                .into_iter()
                .map(|source| match source {
                    Source::RollupDaily => SpendSource::RollupDaily as i32,
                    Source::RollupHourly => SpendSource::RollupHourly as i32,
                    Source::Raw => SpendSource::Raw as i32,
                })
                .collect(),
        })
    }

    async fn find(
        &self,
        request: FindUsageRecordsRequest,
    ) -> Result<FindUsageRecordsResponse, LedgerError> {
        let request_id = request.request_id.trim();
        let trace_id = request.trace_id.trim();
        let rows = match (request_id.is_empty(), trace_id.is_empty()) {
            (false, true) => {
                let id = Uuid::parse_str(request_id).map_err(|_| LedgerError::InvalidArgument {
                    field: "request_id",
                    message: "not a UUID".to_owned(),
                })?;
                self.repo.get(id).await?.into_iter().collect()
            }
            (true, false) => {
                if !is_trace_id(trace_id) {
                    return Err(LedgerError::InvalidArgument {
                        field: "trace_id",
                        message: "not a W3C trace id (32 hex digits)".to_owned(),
                    });
                }
                self.repo.by_trace(&trace_id.to_ascii_lowercase()).await?
            }
            _ => {
                return Err(LedgerError::InvalidFields(vec![
                    (
                        "request_id".to_owned(),
                        "set exactly one of request_id and trace_id".to_owned(),
                    ),
                    (
                        "trace_id".to_owned(),
                        "set exactly one of request_id and trace_id".to_owned(),
                    ),
                ]));
            }
        };
        Ok(FindUsageRecordsResponse {
            records: rows.into_iter().map(record_of).collect(),
        })
    }

    /// Validates an export and returns its page stream (keyset pagination on (time, request_id)).
    fn export(
        &self,
        request: ExportUsageRequest,
    ) -> Result<<LedgerApi as LedgerService>::ExportUsageStream, LedgerError> {
        let (start, end) = time_range(request.start.as_ref(), request.end.as_ref())?;
        let page = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(LedgerError::InvalidArgument {
                    field: "page_size",
                    message: format!("at most {MAX_PAGE}"),
                });
            }
            n => n,
        };
        let filter = filter_of(request.filter);
        let repo = self.repo.clone();
        let span = tracing::Span::current();
        let pages = futures::stream::try_unfold(Cursor::Next(None), move |cursor| {
            let repo = repo.clone();
            let filter = filter.clone();
            let span = span.clone();
            async move {
                let Cursor::Next(after) = cursor else {
                    return Ok(None);
                };
                let rows = tracing::Instrument::instrument(
                    repo.export_page(start, end, &filter, after, i64::from(page)),
                    span,
                )
                .await
                .map_err(|e| to_status(DOMAIN, &LedgerError::from(e)))?;
                let Some(last) = rows.last() else {
                    return Ok(None);
                };
                let next = if rows.len() < page as usize {
                    Cursor::Done
                } else {
                    Cursor::Next(Some((last.time, last.request_id)))
                };
                let records = rows.into_iter().map(record_of).collect();
                Ok(Some((ExportUsageResponse { records }, next)))
            }
        });
        Ok(pages.boxed())
    }

    async fn usage_record(
        &self,
        request: GetUsageRecordRequest,
    ) -> Result<GetUsageRecordResponse, LedgerError> {
        let request_id = Uuid::parse_str(request.request_id.trim()).map_err(|_| {
            LedgerError::InvalidArgument {
                field: "request_id",
                message: "not a UUID".to_owned(),
            }
        })?;
        let row = self
            .repo
            .get(request_id)
            .await?
            .ok_or_else(|| LedgerError::NotFound {
                request_id: request_id.to_string(),
            })?;
        Ok(GetUsageRecordResponse {
            record: Some(record_of(row)),
        })
    }
}

#[tonic::async_trait]
impl LedgerService for LedgerApi {
    type ExportUsageStream =
        futures::stream::BoxStream<'static, Result<ExportUsageResponse, Status>>;

    #[tracing::instrument(skip_all, fields(group_by = request.get_ref().group_by.len()))]
    async fn query_spend(
        &self,
        request: Request<QuerySpendRequest>,
    ) -> Result<Response<QuerySpendResponse>, Status> {
        self.query_spend(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }

    #[tracing::instrument(skip_all)]
    async fn find_usage_records(
        &self,
        request: Request<FindUsageRecordsRequest>,
    ) -> Result<Response<FindUsageRecordsResponse>, Status> {
        self.find(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }

    #[tracing::instrument(skip_all)]
    async fn export_usage(
        &self,
        request: Request<ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        self.export(request.into_inner())
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }

    #[tracing::instrument(skip_all, fields(app = %request.get_ref().app))]
    async fn get_spend(
        &self,
        request: Request<GetSpendRequest>,
    ) -> Result<Response<GetSpendResponse>, Status> {
        self.spend(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }

    #[tracing::instrument(skip_all, fields(app = %request.get_ref().app))]
    async fn list_unpriced(
        &self,
        request: Request<ListUnpricedRequest>,
    ) -> Result<Response<ListUnpricedResponse>, Status> {
        self.unpriced(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }

    #[tracing::instrument(skip_all, fields(request.id = %request.get_ref().request_id))]
    async fn get_usage_record(
        &self,
        request: Request<GetUsageRecordRequest>,
    ) -> Result<Response<GetUsageRecordResponse>, Status> {
        self.usage_record(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(DOMAIN, &e))
    }
}
