//! `BudgetService` handlers (ADR 007): convert protobuf <-> the budget domain, publish alerts.

use jiff::Timestamp;
use prost::Message as _;
use switchboard_proto::ledger::v1::{
    self as pb, AcquireLeaseRequest, AcquireLeaseResponse, AcquireRateSliceRequest,
    AcquireRateSliceResponse, BudgetEnforcement, BudgetPeriod, BudgetScopeKind,
    CreateBudgetRequest, CreateBudgetResponse, ExtendLeaseRequest, ExtendLeaseResponse,
    GetBudgetRequest, GetBudgetResponse, GetBudgetStatusRequest, GetBudgetStatusResponse,
    GetPricesRequest, GetPricesResponse, ListBudgetsRequest, ListBudgetsResponse,
    ReleaseLeaseRequest, ReleaseLeaseResponse, UpdateBudgetRequest, UpdateBudgetResponse,
    budget_service_server::{BudgetService, BudgetServiceServer},
};
use switchboard_status::to_status;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    budget::{
        Alert, Budget, BudgetError, BudgetStore, DECLARED_ID_PREFIX, LeaseGrant, Period, ScopeKind,
        alert_subject, from_odt,
    },
    money::{Pricing, Rates},
    reload::SharedPrices,
};

/// gRPC name of the service (health).
pub const BUDGET_SERVICE_NAME: &str = "switchboard.ledger.v1.BudgetService";

const DOMAIN: &str = "ledger";

/// The `BudgetService` implementation.
#[derive(Debug, Clone)]
pub struct BudgetApi {
    store: BudgetStore,
    prices: SharedPrices,
    nats: async_nats::Client,
    prefix: String,
}

/// The service, ready for `Routes::add_service`.
pub fn server(
    pool: sqlx::PgPool,
    prices: SharedPrices,
    nats: async_nats::Client,
    prefix: String,
) -> BudgetServiceServer<BudgetApi> {
    BudgetServiceServer::new(BudgetApi {
        store: BudgetStore::new(pool),
        prices,
        nats,
        prefix,
    })
}

fn status(error: &BudgetError) -> Status {
    to_status(DOMAIN, error)
}

fn ts(at: Timestamp) -> switchboard_proto::Timestamp {
    switchboard_proto::Timestamp {
        seconds: at.as_second(),
        nanos: at.subsec_nanosecond(),
    }
}

fn odt(at: time::OffsetDateTime) -> switchboard_proto::Timestamp {
    ts(from_odt(at))
}

fn budget_of(pb: Option<pb::Budget>) -> Result<Budget, BudgetError> {
    let invalid = |field: &'static str, message: &str| BudgetError::InvalidArgument {
        field,
        message: message.to_owned(),
    };
    let pb = pb.ok_or_else(|| invalid("budget", "required"))?;
    let scope = pb.scope.unwrap_or_default();
    let kind = match BudgetScopeKind::try_from(scope.kind).unwrap_or_default() {
        BudgetScopeKind::Key => ScopeKind::Key,
        BudgetScopeKind::App => ScopeKind::App,
        BudgetScopeKind::Team => ScopeKind::Team,
        BudgetScopeKind::Org => ScopeKind::Org,
        BudgetScopeKind::Unspecified => return Err(invalid("budget.scope.kind", "required")),
    };
    let period = match BudgetPeriod::try_from(pb.period).unwrap_or_default() {
        BudgetPeriod::Day => Period::Day,
        BudgetPeriod::Week => Period::Week,
        BudgetPeriod::Month => Period::Month,
        BudgetPeriod::Lifetime => Period::Lifetime,
        BudgetPeriod::Unspecified => return Err(invalid("budget.period", "required")),
    };
    let hard = match BudgetEnforcement::try_from(pb.enforcement).unwrap_or_default() {
        BudgetEnforcement::Hard => true,
        BudgetEnforcement::Soft => false,
        BudgetEnforcement::Unspecified => return Err(invalid("budget.enforcement", "required")),
    };
    Ok(Budget {
        id: pb.id,
        kind,
        scope_id: scope.id,
        period,
        time_zone: pb.time_zone,
        limit: pb.limit_usd_nanos,
        hard,
        thresholds: pb.alert_thresholds_pct,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        updated_at: time::OffsetDateTime::UNIX_EPOCH,
    })
}

fn scope_pb(budget: &Budget) -> pb::BudgetScope {
    pb::BudgetScope {
        kind: match budget.kind {
            ScopeKind::Key => BudgetScopeKind::Key,
            ScopeKind::App => BudgetScopeKind::App,
            ScopeKind::Team => BudgetScopeKind::Team,
            ScopeKind::Org => BudgetScopeKind::Org,
        } as i32,
        id: budget.scope_id.clone(),
    }
}

fn enforcement(budget: &Budget) -> i32 {
    if budget.hard {
        BudgetEnforcement::Hard as i32
    } else {
        BudgetEnforcement::Soft as i32
    }
}

fn budget_pb(budget: &Budget) -> pb::Budget {
    pb::Budget {
        id: budget.id.clone(),
        scope: Some(scope_pb(budget)),
        period: match budget.period {
            Period::Day => BudgetPeriod::Day,
            Period::Week => BudgetPeriod::Week,
            Period::Month => BudgetPeriod::Month,
            Period::Lifetime => BudgetPeriod::Lifetime,
        } as i32,
        time_zone: budget.time_zone.clone(),
        limit_usd_nanos: budget.limit,
        enforcement: enforcement(budget),
        alert_thresholds_pct: budget.thresholds.clone(),
        created_at: Some(odt(budget.created_at)),
        updated_at: Some(odt(budget.updated_at)),
    }
}

fn lifetime(budget: &Budget) -> bool {
    budget.period == Period::Lifetime
}

fn lease_pb(lease: &LeaseGrant) -> pb::Lease {
    let periodic = !lifetime(&lease.budget);
    pb::Lease {
        lease_id: if lease.id.is_nil() {
            String::new()
        } else {
            lease.id.to_string()
        },
        budget_id: lease.budget.id.clone(),
        granted_usd_nanos: lease.granted,
        expires_at: Some(ts(lease.expires_at)),
        period_start: periodic.then(|| ts(lease.bounds.start)),
        resets_at: lease.bounds.end.map(ts),
        limit_usd_nanos: lease.budget.limit,
        enforcement: enforcement(&lease.budget),
        remaining_usd_nanos: lease.remaining,
    }
}

fn rates_pb(rates: Rates) -> pb::TokenRates {
    pb::TokenRates {
        input: rates.input.0,
        cached_input: rates.cached_input.0,
        cache_write: rates.cache_write.0,
        output: rates.output.0,
        reasoning: rates.reasoning.0,
    }
}

fn price_pb(provider: String, model: String, pricing: Pricing) -> pb::TargetPrice {
    pb::TargetPrice {
        provider,
        model,
        base: Some(rates_pb(pricing.base)),
        tier_above_prompt_tokens: pricing.tier.map_or(0, |t| t.above_prompt_tokens),
        tier: pricing.tier.map(|t| rates_pb(t.rates)),
    }
}

fn lease_id(text: &str) -> Result<Uuid, BudgetError> {
    Uuid::parse_str(text).map_err(|_| BudgetError::InvalidArgument {
        field: "lease_id",
        message: "must be a UUID".to_owned(),
    })
}

impl BudgetApi {
    /// Publishes alerts (core NATS, after the commit that recorded them as sent). A failed publish
    /// is logged: the threshold stays recorded, so it is not repeated.
    async fn publish(&self, alerts: Vec<Alert>) {
        for alert in alerts {
            let subject = alert_subject(&self.prefix, &alert.budget);
            let message = pb::BudgetAlert {
                budget_id: alert.budget.id.clone(),
                scope: Some(scope_pb(&alert.budget)),
                threshold_pct: alert.threshold,
                spent_usd_nanos: alert.spent,
                limit_usd_nanos: alert.budget.limit,
                period_start: (!lifetime(&alert.budget)).then(|| ts(alert.bounds.start)),
                resets_at: alert.bounds.end.map(ts),
                enforcement: enforcement(&alert.budget),
            };
            tracing::info!(
                budget.id = %alert.budget.id,
                threshold_pct = alert.threshold,
                "budget alert"
            );
            if let Err(error) = self
                .nats
                .publish(subject, message.encode_to_vec().into())
                .await
            {
                tracing::warn!(budget.id = %alert.budget.id, %error, "budget alert not published");
            }
        }
    }
}

#[tonic::async_trait]
impl BudgetService for BudgetApi {
    #[tracing::instrument(skip_all)]
    async fn create_budget(
        &self,
        request: Request<CreateBudgetRequest>,
    ) -> Result<Response<CreateBudgetResponse>, Status> {
        let budget = budget_of(request.into_inner().budget).map_err(|e| status(&e))?;
        if budget.id.starts_with(DECLARED_ID_PREFIX) {
            return Err(status(&BudgetError::InvalidArgument {
                field: "budget.id",
                message: format!(
                    "ids starting with `{DECLARED_ID_PREFIX}` are reserved for budgets declared in \
                     [[ledger.budgets]]"
                ),
            }));
        }
        let stored = self.store.create(budget).await.map_err(|e| status(&e))?;
        Ok(Response::new(CreateBudgetResponse {
            budget: Some(budget_pb(&stored)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<GetBudgetResponse>, Status> {
        let budget = self
            .store
            .get(&request.into_inner().id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(GetBudgetResponse {
            budget: Some(budget_pb(&budget)),
        }))
    }

    /// A budget declared in `[[ledger.budgets]]` (id `config.…`) can be updated too, but its
    /// declared settings are written back at the next ledger start or configuration reload: the
    /// configuration owns them.
    #[tracing::instrument(skip_all)]
    async fn update_budget(
        &self,
        request: Request<UpdateBudgetRequest>,
    ) -> Result<Response<UpdateBudgetResponse>, Status> {
        let budget = budget_of(request.into_inner().budget).map_err(|e| status(&e))?;
        let stored = self.store.update(budget).await.map_err(|e| status(&e))?;
        Ok(Response::new(UpdateBudgetResponse {
            budget: Some(budget_pb(&stored)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_budgets(
        &self,
        _request: Request<ListBudgetsRequest>,
    ) -> Result<Response<ListBudgetsResponse>, Status> {
        let budgets = self.store.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(ListBudgetsResponse {
            budgets: budgets.iter().map(budget_pb).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_budget_status(
        &self,
        request: Request<GetBudgetStatusRequest>,
    ) -> Result<Response<GetBudgetStatusResponse>, Status> {
        let (budget, bounds, state) = self
            .store
            .status(&request.into_inner().id, Timestamp::now())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(GetBudgetStatusResponse {
            status: Some(pb::BudgetStatus {
                period_start: (!lifetime(&budget)).then(|| ts(bounds.start)),
                resets_at: bounds.end.map(ts),
                settled_usd_nanos: state.settled,
                recorded_usd_nanos: state.recorded,
                leased_usd_nanos: state.leased,
                remaining_usd_nanos: state.remaining(budget.limit),
                open_leases: u32::try_from(state.open_leases).unwrap_or(u32::MAX),
                budget: Some(budget_pb(&budget)),
            }),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        let r = request.into_inner();
        let outcome = self
            .store
            .acquire(
                &r.budget_id,
                &r.holder,
                r.requested_usd_nanos,
                r.minimum_usd_nanos,
                r.ttl_ms,
                Timestamp::now(),
            )
            .await
            .map_err(|e| status(&e))?;
        let lease = lease_pb(&outcome.lease);
        self.publish(outcome.alerts).await;
        Ok(Response::new(AcquireLeaseResponse { lease: Some(lease) }))
    }

    #[tracing::instrument(skip_all)]
    async fn extend_lease(
        &self,
        request: Request<ExtendLeaseRequest>,
    ) -> Result<Response<ExtendLeaseResponse>, Status> {
        let r = request.into_inner();
        let id = lease_id(&r.lease_id).map_err(|e| status(&e))?;
        let outcome = self
            .store
            .extend(
                id,
                "",
                r.spent_usd_nanos,
                r.requested_usd_nanos,
                r.minimum_usd_nanos,
                r.ttl_ms,
                Timestamp::now(),
            )
            .await
            .map_err(|e| status(&e))?;
        let lease = lease_pb(&outcome.lease);
        self.publish(outcome.alerts).await;
        Ok(Response::new(ExtendLeaseResponse { lease: Some(lease) }))
    }

    #[tracing::instrument(skip_all)]
    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let r = request.into_inner();
        let id = lease_id(&r.lease_id).map_err(|e| status(&e))?;
        let alerts = self
            .store
            .release(id, r.spent_usd_nanos, Timestamp::now())
            .await
            .map_err(|e| status(&e))?;
        self.publish(alerts).await;
        Ok(Response::new(ReleaseLeaseResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_prices(
        &self,
        request: Request<GetPricesRequest>,
    ) -> Result<Response<GetPricesResponse>, Status> {
        let book = self.prices.current();
        let now = time::OffsetDateTime::now_utc();
        let prices = request
            .into_inner()
            .targets
            .into_iter()
            .filter_map(|t| {
                let pricing = book.lookup(&t.provider, &t.model, now)?;
                Some(price_pb(t.provider, t.model, pricing))
            })
            .collect();
        Ok(Response::new(GetPricesResponse { prices }))
    }

    #[tracing::instrument(skip_all)]
    async fn acquire_rate_slice(
        &self,
        request: Request<AcquireRateSliceRequest>,
    ) -> Result<Response<AcquireRateSliceResponse>, Status> {
        let r = request.into_inner();
        let (requests, tokens, window) = self
            .store
            .rate_slice(
                &r.scope,
                (r.requests_per_minute, r.tokens_per_minute),
                (r.want_requests, r.want_tokens),
                Timestamp::now(),
            )
            .await
            .map_err(|e| status(&e))?;
        let end = Timestamp::from_second(window.as_second() + 60).unwrap_or(window);
        Ok(Response::new(AcquireRateSliceResponse {
            granted_requests: requests,
            granted_tokens: tokens,
            window_start: Some(ts(window)),
            window_end: Some(ts(end)),
        }))
    }
}
