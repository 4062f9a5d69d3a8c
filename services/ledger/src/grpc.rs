//! gRPC handlers: convert protobuf <-> domain and map errors.

use switchboard_proto::ledger::v1::{
    GetSpendRequest, GetSpendResponse, GetUsageRecordRequest, GetUsageRecordResponse,
    ListUnpricedRequest, ListUnpricedResponse, SpendRow, UnpricedModel, UsageRecord,
    ledger_service_server::LedgerService,
};
use switchboard_status::to_status;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    error::{DOMAIN, LedgerError},
    record::{UsageRow, time_to_timestamp, timestamp_to_time},
    repo::Repository,
};

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

impl LedgerApi {
    async fn unpriced(
        &self,
        request: ListUnpricedRequest,
    ) -> Result<ListUnpricedResponse, LedgerError> {
        let (start, end) = time_range(request.start.as_ref(), request.end.as_ref())?;
        let app = Some(request.app.as_str()).filter(|app| !app.is_empty());
        let models = self
            .repo
            .unpriced(start, end, app)
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
    type ExportUsageStream = futures::stream::BoxStream<
        'static,
        Result<switchboard_proto::ledger::v1::ExportUsageResponse, Status>,
    >;

    async fn query_spend(
        &self,
        _request: Request<switchboard_proto::ledger::v1::QuerySpendRequest>,
    ) -> Result<Response<switchboard_proto::ledger::v1::QuerySpendResponse>, Status> {
        Err(Status::unimplemented("not yet"))
    }

    async fn find_usage_records(
        &self,
        _request: Request<switchboard_proto::ledger::v1::FindUsageRecordsRequest>,
    ) -> Result<Response<switchboard_proto::ledger::v1::FindUsageRecordsResponse>, Status> {
        Err(Status::unimplemented("not yet"))
    }

    async fn export_usage(
        &self,
        _request: Request<switchboard_proto::ledger::v1::ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        Err(Status::unimplemented("not yet"))
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
