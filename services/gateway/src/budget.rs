//! Budget enforcement at the gateway (ADR 007).
//!
//! The ledger leases each gateway replica slices of a budget's remaining amount; a request reserves
//! its upper-bound estimate from the local slice (a mutex held for a few arithmetic operations, never
//! across an await), passes what it reserved to the router as its spend allowance (so that every
//! attempt, fallbacks included, is checked against it), and settles to the true cost of the usage
//! the attempts reported, priced with the ledger's rules (`switchboard_pricing`). Only when the
//! slice runs low does a request wait for the ledger (`ExtendLease`/`AcquireLease`, one at a time
//! per budget). A background task re-reads the budgets, the routes' targets and their prices, and
//! reports each lease's spend (which also pushes its expiry); leases are released at shutdown.
//!
//! With no budget for the caller's key, app, team or organisation, a request costs two hash
//! lookups and no RPC. With budgets disabled, nothing here exists.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;
use switchboard_config::ConfigError;
use switchboard_grpc::TracedChannel;
use switchboard_pricing::allowance as spend;
use switchboard_proto::{
    chat::v1::{ChatRequest, RouteInfo, SamplingParams, Usage, content_part::Part},
    ledger::v1::{
        AcquireLeaseRequest, BudgetEnforcement, BudgetScopeKind, ExtendLeaseRequest,
        GetPricesRequest, Lease, ListBudgetsRequest, PriceTarget, ReleaseLeaseRequest, TargetPrice,
        budget_service_client::BudgetServiceClient,
    },
    router::v1::{ListModelsRequest, SpendAllowance, router_service_client::RouterServiceClient},
};
use tokio_util::sync::CancellationToken;

use crate::{auth::Principal, error::GatewayError};

/// Tokens assumed for one image in a prompt (an upper bound of the providers' image pricing).
const IMAGE_TOKENS: u32 = 3_000;
/// Tokens assumed per message for roles and separators.
const MESSAGE_OVERHEAD_TOKENS: u32 = 8;
/// A request for a route the catalog does not know reloads the catalog (the route may be new),
/// but at most once per this interval: a client sending made-up model names must not turn each
/// request into ledger and router calls. Within it, such requests use the current catalog (a
/// route added meanwhile is known at the next reload, at the latest after `refresh_ms`).
const UNKNOWN_ROUTE_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// `[gateway.budgets]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsConfig {
    /// Enforce the budgets defined in the ledger (`BudgetService`). Off: no budget code runs.
    pub enabled: bool,
    /// How often budgets, route targets and prices are re-read, and lease spend reported (ms).
    pub refresh_ms: u64,
    /// Lifetime of a lease (ms); it is extended every third of it while the gateway runs.
    pub lease_ttl_ms: u32,
    /// Size of a lease slice, percent of the budget's limit (at least what the request needs).
    pub lease_pct: u32,
    /// Output tokens assumed when a request sets no `max_tokens` (it is then sent with this
    /// `max_tokens`, so the estimate bounds the answer).
    pub default_max_output_tokens: u32,
    /// After the ledger refused a slice, requests over that budget are refused locally for this
    /// long (ms) instead of asking again.
    pub denied_backoff_ms: u64,
    /// Name of this replica in the ledger's leases; empty: a random id.
    pub holder: String,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        BudgetsConfig {
            enabled: false,
            refresh_ms: 10_000,
            lease_ttl_ms: 30_000,
            lease_pct: 10,
            default_max_output_tokens: 4_096,
            denied_backoff_ms: 1_000,
            holder: String::new(),
        }
    }
}

impl BudgetsConfig {
    /// Checks values that types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.refresh_ms == 0 {
            return Err(ConfigError::invalid(
                "gateway.budgets.refresh_ms",
                "must be greater than 0",
            ));
        }
        if self.lease_ttl_ms < 300 {
            return Err(ConfigError::invalid(
                "gateway.budgets.lease_ttl_ms",
                "must be at least 300",
            ));
        }
        if self.lease_pct == 0 || self.lease_pct > 100 {
            return Err(ConfigError::invalid(
                "gateway.budgets.lease_pct",
                "must be between 1 and 100",
            ));
        }
        if self.default_max_output_tokens == 0 {
            return Err(ConfigError::invalid(
                "gateway.budgets.default_max_output_tokens",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// The budget enforcer of one gateway replica (cheap to clone).
#[derive(Clone)]
pub struct Budgets(Arc<Inner>);

struct Inner {
    ledger: BudgetServiceClient<TracedChannel>,
    router: RouterServiceClient<TracedChannel>,
    config: BudgetsConfig,
    holder: String,
    catalog: RwLock<Arc<Catalog>>,
    /// One catalog reload at a time.
    reload: tokio::sync::Mutex<()>,
    /// When the last catalog reload started (successful or not).
    reloaded: Mutex<Option<Instant>>,
    /// [`UNKNOWN_ROUTE_RELOAD_EVERY`] (tests lengthen it).
    unknown_route_reload_every: Duration,
    /// Budgets gone from the catalog whose retired leases still wait for their final report.
    closed: Mutex<Vec<Arc<Slot>>>,
    /// Where the last catalog read is kept, for a start while the ledger is down (`None`: not
    /// kept).
    catalog_file: Option<std::path::PathBuf>,
    /// What this replica last wrote there.
    catalog_written: Mutex<Option<Vec<u8>>>,
}

/// What a catalog is built from, as it is saved in the replica's catalog file (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
struct SavedCatalog {
    #[prost(message, repeated, tag = "1")]
    budgets: Vec<switchboard_proto::ledger::v1::Budget>,
    #[prost(message, repeated, tag = "2")]
    routes: Vec<switchboard_proto::router::v1::RouteTargets>,
    #[prost(message, repeated, tag = "3")]
    prices: Vec<TargetPrice>,
}

/// Budgets by scope, and the prices of each route's targets.
#[derive(Default)]
struct Catalog {
    loaded: bool,
    keys: HashMap<String, Vec<Arc<Slot>>>,
    apps: HashMap<String, Vec<Arc<Slot>>>,
    teams: HashMap<String, Vec<Arc<Slot>>>,
    org: Vec<Arc<Slot>>,
    by_id: HashMap<String, Arc<Slot>>,
    routes: HashMap<String, Arc<[TargetPrice]>>,
}

/// One budget at this replica: its definition and the local state of its lease.
struct Slot {
    id: String,
    /// Enforcement and limit, updated in place when the budget changes (its lease is then retired,
    /// so that the next reservation leases under the new settings).
    hard: AtomicBool,
    limit: AtomicI64,
    /// Period and time zone (`Budget.period`, `Budget.time_zone`): read only by the catalog
    /// refresh, which retires the lease when they change (the lease belongs to a period the
    /// budget no longer has).
    calendar: Mutex<(i32, String)>,
    /// `app:<app>`, `key:<id>`, `team:<team>` or `org` (for errors).
    scope: String,
    local: Mutex<Local>,
    /// One ledger call at a time for this budget.
    refill: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(id: String, hard: bool, limit: i64, calendar: (i32, String), scope: String) -> Self {
        Slot {
            id,
            hard: AtomicBool::new(hard),
            limit: AtomicI64::new(limit),
            calendar: Mutex::new(calendar),
            scope,
            local: Mutex::new(Local::default()),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    fn hard(&self) -> bool {
        self.hard.load(Ordering::Relaxed)
    }

    fn limit(&self) -> i64 {
        self.limit.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Local {
    /// Current lease id (empty: none).
    lease: String,
    granted: i64,
    /// Settled on the current lease (reported to the ledger or not yet).
    spent: i64,
    /// Reserved from the current lease by requests in flight.
    reserved: i64,
    /// Locally assumed expiry (before the ledger's, by a margin).
    expires: Option<Instant>,
    /// Reset time of the lease's period, RFC 3339 (empty for lifetime budgets).
    resets_at: String,
    /// The same instant on this replica's monotonic clock (none for lifetime budgets): from then on
    /// the lease serves nothing and is retired (`roll`).
    period_end: Option<Instant>,
    /// Start of the lease's period, Unix seconds (none for lifetime budgets).
    period_start: Option<i64>,
    /// Refused by the ledger: refuse locally until then.
    denied_until: Option<Instant>,
    /// Generation of the current lease: a reservation remembers it, and settles on the lease it
    /// was taken from even when that lease has been retired since.
    epoch: u64,
    /// Leases that serve no new reservation (their period ended, or their budget changed), with
    /// the reservations still in flight on them; the background task reports their spend until
    /// none is left.
    retired: Vec<Retired>,
    /// The budget is gone from the catalog: it constrains nothing any more.
    closed: bool,
}

/// A lease that no longer serves reservations, while the ones taken from it settle.
#[derive(Debug)]
struct Retired {
    epoch: u64,
    lease: String,
    spent: i64,
    reserved: i64,
}

impl Local {
    fn available(&self, now: Instant) -> i64 {
        let live = !self.lease.is_empty()
            && self.expires.is_some_and(|expires| now < expires)
            && self.period_end.is_none_or(|end| now < end);
        if live {
            self.granted - self.spent - self.reserved
        } else {
            0
        }
    }

    /// At the end of the lease's period the lease is retired: what was reserved from it before
    /// the reset settles on it (the usage rows of those requests carry their start time, in that
    /// period), and nothing new is reserved from it; a refusal of the past period no longer holds.
    fn roll(&mut self, now: Instant) {
        if self.period_end.is_some_and(|end| now >= end) {
            self.retire();
            self.period_end = None;
            self.denied_until = None;
        }
    }

    /// Moves the current lease, its spend and its reservations in flight to `retired`; a new
    /// epoch starts without a lease.
    fn retire(&mut self) {
        if self.lease.is_empty() {
            return;
        }
        self.retired.push(Retired {
            epoch: self.epoch,
            lease: std::mem::take(&mut self.lease),
            spent: std::mem::take(&mut self.spent),
            reserved: std::mem::take(&mut self.reserved),
        });
        self.epoch += 1;
        self.granted = 0;
        self.expires = None;
        self.period_start = None;
    }

    /// Reserves `amount` from the current lease; returns its epoch.
    fn hold(&mut self, amount: i64) -> u64 {
        self.reserved += amount;
        self.epoch
    }

    /// The (reserved, spent) counters of the lease a reservation of `epoch` was taken from (the
    /// current one when that lease is no longer known).
    fn counters(&mut self, epoch: u64) -> (&mut i64, &mut i64) {
        if epoch != self.epoch
            && let Some(at) = self.retired.iter().position(|r| r.epoch == epoch)
        {
            let retired = &mut self.retired[at];
            return (&mut retired.reserved, &mut retired.spent);
        }
        (&mut self.reserved, &mut self.spent)
    }

    /// Gives `amount` of a reservation of `epoch` back unspent.
    fn unhold(&mut self, epoch: u64, amount: i64) {
        *self.counters(epoch).0 -= amount;
    }

    /// Settles a reservation of `epoch` (`held`) at `cost`.
    fn settle(&mut self, epoch: u64, held: i64, cost: i64) {
        let (reserved, spent) = self.counters(epoch);
        *reserved -= held;
        *spent = spent.saturating_add(cost.max(0));
    }
}

fn lock(local: &Mutex<Local>) -> std::sync::MutexGuard<'_, Local> {
    local.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request's reservation: settled with the true cost, or (dropped unsettled, e.g. the caller went
/// away) with the whole reserved amount, which over-counts but never under-counts.
pub struct Reservation {
    holds: Vec<Hold>,
    allowance: i64,
    /// A hard budget applies: only then does the router get an allowance to keep within.
    hard: bool,
    prompt_tokens: u32,
    max_output_tokens: u32,
    prices: Arc<[TargetPrice]>,
    settled: bool,
}

/// What one request reserved from one budget, and from which of its leases.
struct Hold {
    slot: Arc<Slot>,
    held: i64,
    epoch: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("allowance", &self.allowance)
            .field("budgets", &self.holds.len())
            .finish()
    }
}

impl Reservation {
    /// The allowance to send with the route request; none when only soft budgets apply (they
    /// alert, never block: the router may then send any target, priced or not).
    pub fn allowance(&self) -> Option<SpendAllowance> {
        self.hard.then(|| SpendAllowance {
            allowance_usd_nanos: self.allowance,
            prompt_tokens: self.prompt_tokens,
            max_output_tokens: self.max_output_tokens,
            prices: self.prices.to_vec(),
        })
    }

    /// The cost of the attempts of `route` (each at its own target's price); an attempt with
    /// usage on a target without a price costs the whole allowance (never less than true).
    pub fn cost_of(&self, route: &RouteInfo) -> i64 {
        let prices = &self.prices;
        route
            .attempts
            .iter()
            .filter_map(|attempt| {
                let usage = attempt.usage.as_ref()?;
                if usage.prompt_tokens == 0 && usage.completion_tokens == 0 {
                    return Some(0);
                }
                Some(
                    match spend::find(prices, &attempt.provider, &attempt.model) {
                        Some(price) => spend::cost(&spend::pricing_of(price), usage),
                        None => self.allowance,
                    },
                )
            })
            .fold(0i64, i64::saturating_add)
    }

    /// Settles with the attempts of `route`.
    pub fn settle_route(self, route: &RouteInfo) {
        let cost = self.cost_of(route);
        self.settle(cost);
    }

    /// Settles with one usage served by (provider, model) (embeddings).
    pub fn settle_usage(self, provider: &str, model: &str, usage: &Usage) {
        let cost = match spend::find(&self.prices, provider, model) {
            Some(price) => spend::cost(&spend::pricing_of(price), usage),
            None if usage.prompt_tokens == 0 && usage.completion_tokens == 0 => 0,
            None => self.allowance,
        };
        self.settle(cost);
    }

    /// Releases the reservation and records `cost` as spent on every budget.
    pub fn settle(mut self, cost: i64) {
        self.finish(cost);
    }

    fn finish(&mut self, cost: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        for hold in &self.holds {
            lock(&hold.slot.local).settle(hold.epoch, hold.held, cost);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let cost = self.allowance;
        self.finish(cost);
    }
}

/// Upper bound of the prompt's tokens: its bytes (no tokenizer makes more tokens than bytes of
/// UTF-8 text), a per-message overhead, and a fixed amount per image.
pub fn prompt_bound(request: &ChatRequest) -> u32 {
    let mut bytes: u64 = 0;
    let mut images: u64 = 0;
    for message in &request.messages {
        bytes += u64::from(MESSAGE_OVERHEAD_TOKENS) + message.name.len() as u64;
        for part in &message.content {
            match &part.part {
                Some(Part::Text(text)) => bytes += text.len() as u64,
                Some(Part::ImageUrl(_)) => images += 1,
                None => {}
            }
        }
        for call in &message.tool_calls {
            bytes += (call.name.len() + call.arguments_json.len() + call.id.len()) as u64;
        }
    }
    for tool in &request.tools {
        bytes += (tool.name.len() + tool.description.len() + tool.parameters_json.len()) as u64;
    }
    if let Some(format) = &request.response_format {
        bytes += format.json_schema_json.len() as u64;
    }
    let total = bytes + images * u64::from(IMAGE_TOKENS);
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// Upper bound of the answer's tokens: `max_tokens` (`default_max_output_tokens` when the request
/// has none) for each of its `n` choices. The budget estimate and the token rate limit
/// (`ratelimit.rs`) both charge this.
pub fn output_bound(sampling: Option<&SamplingParams>, default_max_output_tokens: u32) -> u32 {
    let (max_tokens, n) = sampling.map_or((None, None), |s| (s.max_tokens, s.n));
    max_tokens
        .unwrap_or(default_max_output_tokens)
        .saturating_mul(n.unwrap_or(1).max(1))
}

fn scope_label(kind: BudgetScopeKind, id: &str) -> String {
    match kind {
        BudgetScopeKind::Key => format!("key:{id}"),
        BudgetScopeKind::App => format!("app:{id}"),
        BudgetScopeKind::Team => format!("team:{id}"),
        BudgetScopeKind::Org | BudgetScopeKind::Unspecified => "org".to_owned(),
    }
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return String::new();
    };
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp(ts.seconds) else {
        return String::new();
    };
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Budgets {
    /// An enforcer talking to the ledger and the router over these channels.
    /// `catalog_file`: where the catalog read last is kept, to start from while the ledger is
    /// unreachable.
    pub fn new(
        config: BudgetsConfig,
        ledger: TracedChannel,
        router: TracedChannel,
        catalog_file: Option<std::path::PathBuf>,
    ) -> Self {
        Self::build(
            config,
            ledger,
            router,
            UNKNOWN_ROUTE_RELOAD_EVERY,
            catalog_file,
        )
    }

    fn build(
        config: BudgetsConfig,
        ledger: TracedChannel,
        router: TracedChannel,
        unknown_route_reload_every: Duration,
        catalog_file: Option<std::path::PathBuf>,
    ) -> Self {
        let holder = if config.holder.is_empty() {
            format!("gateway-{}", uuid::Uuid::now_v7())
        } else {
            config.holder.clone()
        };
        Budgets(Arc::new(Inner {
            ledger: BudgetServiceClient::new(ledger),
            router: RouterServiceClient::new(router),
            config,
            holder,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            reload: tokio::sync::Mutex::new(()),
            reloaded: Mutex::new(None),
            unknown_route_reload_every,
            closed: Mutex::new(Vec::new()),
            catalog_file,
            catalog_written: Mutex::new(None),
        }))
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.0
            .catalog
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The budgets that apply to `principal` (no allocation when there are none).
    fn slots_of(catalog: &Catalog, principal: &Principal) -> Vec<Arc<Slot>> {
        let mut slots = Vec::new();
        for list in [
            catalog.keys.get(&principal.key_id),
            catalog.apps.get(&principal.app),
            catalog.teams.get(&principal.team),
            Some(&catalog.org),
        ]
        .into_iter()
        .flatten()
        {
            slots.extend(list.iter().cloned());
        }
        slots
    }

    /// Reserves the request's estimate against every budget of the caller. `None`: no budget
    /// applies. The request's `max_tokens` is set when it had none, so the estimate bounds it.
    /// For embeddings (`chat` false) no output is estimated and the request is left as it is.
    pub async fn reserve(
        &self,
        principal: &Principal,
        request: &mut ChatRequest,
        chat: bool,
    ) -> Result<Option<Reservation>, GatewayError> {
        let mut catalog = self.catalog();
        if !catalog.loaded {
            self.reload().await?;
            catalog = self.catalog();
        }
        let slots = Self::slots_of(&catalog, principal);
        if slots.is_empty() {
            return Ok(None);
        }
        let prices = match catalog.routes.get(&request.model) {
            Some(prices) => prices.clone(),
            None => {
                // Perhaps a route added since the last reload.
                self.reload_for_route().await?;
                self.catalog()
                    .routes
                    .get(&request.model)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(Vec::new()))
            }
        };
        let max_output = if chat {
            let default = self.0.config.default_max_output_tokens;
            let sampling = request.sampling.get_or_insert_with(Default::default);
            sampling.max_tokens.get_or_insert(default);
            output_bound(Some(sampling), default)
        } else {
            0
        };
        let prompt = prompt_bound(request);
        let estimates = prices
            .iter()
            .map(|p| spend::estimate(&spend::pricing_of(p), prompt, max_output));
        let want = estimates.clone().max().unwrap_or(0);
        let need = estimates.min().unwrap_or(0);
        let mut holds: Vec<Hold> = Vec::with_capacity(slots.len());
        let mut allowance = want;
        let mut hard = false;
        for slot in slots {
            match self.take(&slot, want, need).await {
                Ok((held, epoch)) => {
                    if slot.hard() {
                        hard = true;
                        allowance = allowance.min(held);
                    }
                    holds.push(Hold { slot, held, epoch });
                }
                Err(error) => {
                    // What was taken from the other budgets goes back.
                    for hold in holds {
                        lock(&hold.slot.local).unhold(hold.epoch, hold.held);
                    }
                    return Err(error);
                }
            }
        }
        // Every hard budget keeps only the common allowance.
        for hold in &mut holds {
            if hold.held > allowance {
                lock(&hold.slot.local).unhold(hold.epoch, hold.held - allowance);
                hold.held = allowance;
            }
        }
        Ok(Some(Reservation {
            holds,
            allowance,
            hard,
            prompt_tokens: prompt,
            max_output_tokens: max_output,
            prices,
            settled: false,
        }))
    }

    /// Takes `want` (at least `need`, for a hard budget) from the slot's lease, asking the ledger
    /// for more when the lease cannot cover it. Returns the amount and the lease's epoch.
    async fn take(&self, slot: &Slot, want: i64, need: i64) -> Result<(i64, u64), GatewayError> {
        if let Some(held) = try_take(slot, want, want) {
            return Ok(held);
        }
        let _refill = slot.refill.lock().await;
        if let Some(held) = try_take(slot, want, want) {
            return Ok(held);
        }
        let now = Instant::now();
        let denied = lock(&slot.local)
            .denied_until
            .is_some_and(|until| now < until);
        // Fail closed: without the ledger a hard budget cannot be kept.
        if !denied
            && let Err(error) = self.refill(slot, want, need).await
            && slot.hard()
        {
            return Err(error);
        }
        // What the lease has, when it covers at least the cheapest target.
        if let Some(held) = try_take(slot, want, need) {
            return Ok(held);
        }
        if !slot.hard() {
            // A soft budget never blocks: the spend is recorded against it anyway.
            return Ok((want, lock(&slot.local).hold(want)));
        }
        if !denied {
            lock(&slot.local).denied_until =
                Some(now + Duration::from_millis(self.0.config.denied_backoff_ms));
        }
        Err(exceeded(slot))
    }

    /// Extends the slot's lease (reporting its spend) or acquires one, asking for a slice (at
    /// least `want`; nothing is worth less than what makes `need` available).
    async fn refill(&self, slot: &Slot, want: i64, need: i64) -> Result<(), GatewayError> {
        let ttl = self.0.config.lease_ttl_ms;
        let slice = (i128::from(slot.limit()) * i128::from(self.0.config.lease_pct) / 100) as i64;
        let (lease, spent, available) = {
            let mut local = lock(&slot.local);
            let now = Instant::now();
            local.roll(now);
            (local.lease.clone(), local.spent, local.available(now))
        };
        // What the ledger is told spent on the lease (an acquire reports nothing).
        let reported = if lease.is_empty() { 0 } else { spent };
        let requested = slice.max(want);
        let minimum = (need - available.max(0)).max(1);
        let sent = Instant::now();
        let mut ledger = self.0.ledger.clone();
        let answer = if lease.is_empty() {
            ledger
                .acquire_lease(AcquireLeaseRequest {
                    budget_id: slot.id.clone(),
                    holder: self.0.holder.clone(),
                    requested_usd_nanos: requested,
                    minimum_usd_nanos: minimum,
                    ttl_ms: ttl,
                })
                .await
                .map(|r| r.into_inner().lease)
        } else {
            ledger
                .extend_lease(ExtendLeaseRequest {
                    lease_id: lease.clone(),
                    spent_usd_nanos: spent,
                    requested_usd_nanos: requested,
                    minimum_usd_nanos: minimum,
                    ttl_ms: ttl,
                })
                .await
                .map(|r| r.into_inner().lease)
        };
        let granted = answer.map_err(|status| {
            tracing::warn!(budget.id = %slot.id, code = ?status.code(), "budget lease refused by the ledger");
            GatewayError::DependencyDown { service: "ledger" }
        })?;
        if let Some(granted) = granted {
            apply(slot, &lease, reported, &granted, sent, ttl);
        }
        Ok(())
    }

    /// Reloads the catalog for a request whose route it does not know, unless a reload started
    /// after the request asked or less than [`UNKNOWN_ROUTE_RELOAD_EVERY`] before.
    async fn reload_for_route(&self) -> Result<(), GatewayError> {
        let asked = Instant::now();
        let _one = self.0.reload.lock().await;
        let last = *self
            .0
            .reloaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| {
            at >= asked || asked.duration_since(at) < self.0.unknown_route_reload_every
        }) {
            return Ok(());
        }
        self.reload_locked().await
    }

    /// Re-reads budgets, route targets and prices; keeps the local state of known budgets.
    pub async fn reload(&self) -> Result<(), GatewayError> {
        let _one = self.0.reload.lock().await;
        self.reload_locked().await
    }

    async fn reload_locked(&self) -> Result<(), GatewayError> {
        *self
            .0
            .reloaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let fetched = match self.fetch().await {
            Ok(fetched) => {
                self.save(&fetched);
                fetched
            }
            // A replica starting while the ledger (or the router) is unreachable uses the catalog
            // it saved last: callers without a budget are served, and hard budgets still fail
            // closed, for want of a lease. The refresh replaces it once the ledger answers.
            Err(error) if !self.catalog().loaded => match self.saved() {
                Some(saved) => {
                    tracing::warn!(
                        error = %error,
                        "budget catalog unreachable at start: using the one saved last"
                    );
                    saved
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        };
        self.install(fetched).await
    }

    /// Budgets, route targets and their prices, from the ledger and the router.
    async fn fetch(&self) -> Result<SavedCatalog, GatewayError> {
        let budgets = self
            .0
            .ledger
            .clone()
            .list_budgets(ListBudgetsRequest {})
            .await
            .map_err(|_| GatewayError::DependencyDown { service: "ledger" })?
            .into_inner()
            .budgets;
        let routes = self
            .0
            .router
            .clone()
            .list_models(ListModelsRequest {})
            .await
            .map_err(|_| GatewayError::DependencyDown { service: "router" })?
            .into_inner()
            .routes;
        let mut targets: Vec<PriceTarget> = routes
            .iter()
            .flat_map(|r| r.targets.iter().cloned())
            .collect();
        targets.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        targets.dedup();
        let prices = self
            .0
            .ledger
            .clone()
            .get_prices(GetPricesRequest { targets })
            .await
            .map_err(|_| GatewayError::DependencyDown { service: "ledger" })?
            .into_inner()
            .prices;
        Ok(SavedCatalog {
            budgets,
            routes,
            prices,
        })
    }

    /// Keeps `catalog` in the replica's catalog file (written whole, then renamed), for a start
    /// while the ledger is down. A failure is logged: the catalog in memory is what serves.
    fn save(&self, catalog: &SavedCatalog) {
        let Some(path) = &self.0.catalog_file else {
            return;
        };
        let bytes = prost::Message::encode_to_vec(catalog);
        // Every refresh reads the same catalog most of the time: written only when it changed.
        let mut written = self
            .0
            .catalog_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if written.as_deref() == Some(bytes.as_slice()) {
            return;
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // Per replica, should two share the directory.
            let partial = path.with_extension(format!("partial-{}", self.0.holder));
            std::fs::write(&partial, &bytes)?;
            std::fs::rename(&partial, path)
        };
        match write() {
            Ok(()) => *written = Some(bytes),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "budget catalog not saved");
            }
        }
    }

    /// The catalog saved last, if there is one that reads.
    fn saved(&self) -> Option<SavedCatalog> {
        let bytes = std::fs::read(self.0.catalog_file.as_ref()?).ok()?;
        <SavedCatalog as prost::Message>::decode(bytes.as_slice()).ok()
    }

    /// Installs a catalog read from the ledger and the router (or saved); keeps the local state of
    /// known budgets.
    async fn install(&self, fetched: SavedCatalog) -> Result<(), GatewayError> {
        let SavedCatalog {
            budgets,
            routes,
            prices,
        } = fetched;
        let previous = self.catalog();
        let mut catalog = Catalog {
            loaded: true,
            ..Catalog::default()
        };
        for route in routes {
            let priced: Vec<TargetPrice> = route
                .targets
                .iter()
                .filter_map(|t| spend::find(&prices, &t.provider, &t.model).cloned())
                .collect();
            catalog.routes.insert(route.route, Arc::from(priced));
        }
        for budget in budgets {
            let scope = budget.scope.unwrap_or_default();
            let kind = BudgetScopeKind::try_from(scope.kind).unwrap_or_default();
            let hard = budget.enforcement == BudgetEnforcement::Hard as i32;
            let calendar = (budget.period, budget.time_zone.clone());
            let slot = match previous.by_id.get(&budget.id) {
                Some(slot) => {
                    let moved = {
                        let mut current =
                            slot.calendar.lock().unwrap_or_else(PoisonError::into_inner);
                        let moved = *current != calendar;
                        *current = calendar;
                        moved
                    };
                    if moved || slot.hard() != hard || slot.limit() != budget.limit_usd_nanos {
                        // Changed: the lease taken under the old settings serves nothing more
                        // (under a new period or time zone it belongs to a period the budget no
                        // longer has); what is in flight on it settles there and is reported
                        // below. A refusal under the old settings does not hold either.
                        slot.hard.store(hard, Ordering::Relaxed);
                        slot.limit.store(budget.limit_usd_nanos, Ordering::Relaxed);
                        let mut local = lock(&slot.local);
                        local.retire();
                        local.denied_until = None;
                    }
                    slot.clone()
                }
                None => Arc::new(Slot::new(
                    budget.id.clone(),
                    hard,
                    budget.limit_usd_nanos,
                    calendar,
                    scope_label(kind, &scope.id),
                )),
            };
            match kind {
                BudgetScopeKind::Key => {
                    catalog.keys.entry(scope.id).or_default().push(slot.clone())
                }
                BudgetScopeKind::App => {
                    catalog.apps.entry(scope.id).or_default().push(slot.clone())
                }
                BudgetScopeKind::Team => {
                    catalog
                        .teams
                        .entry(scope.id)
                        .or_default()
                        .push(slot.clone());
                }
                BudgetScopeKind::Org => catalog.org.push(slot.clone()),
                BudgetScopeKind::Unspecified => continue,
            }
            catalog.by_id.insert(budget.id, slot);
        }
        let catalog = Arc::new(catalog);
        *self
            .0
            .catalog
            .write()
            .unwrap_or_else(PoisonError::into_inner) = catalog.clone();
        // A removed budget constrains nothing more; its lease is retired and reported like a
        // changed budget's, once what is in flight on it has settled.
        for (id, slot) in &previous.by_id {
            if !catalog.by_id.contains_key(id) {
                let mut local = lock(&slot.local);
                local.closed = true;
                local.retire();
                drop(local);
                self.0
                    .closed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(slot.clone());
            }
        }
        // Changed and removed budgets give their unspent grants back now.
        for slot in self.retiring(&catalog) {
            let _refill = slot.refill.lock().await;
            self.report_retired(&slot).await;
        }
        Ok(())
    }

    /// The slots that have retired leases (of the catalog and of removed budgets); forgets removed
    /// budgets with none left.
    fn retiring(&self, catalog: &Catalog) -> Vec<Arc<Slot>> {
        let mut closed = self.0.closed.lock().unwrap_or_else(PoisonError::into_inner);
        closed.retain(|slot| !lock(&slot.local).retired.is_empty());
        catalog
            .by_id
            .values()
            .chain(closed.iter())
            .filter(|slot| !lock(&slot.local).retired.is_empty())
            .cloned()
            .collect()
    }

    /// Reports every lease's spend (retired ones included) and pushes its expiry.
    async fn report(&self) {
        let ttl = self.0.config.lease_ttl_ms;
        let catalog = self.catalog();
        for slot in self.retiring(&catalog) {
            let _refill = slot.refill.lock().await;
            self.report_retired(&slot).await;
        }
        for slot in catalog.by_id.values() {
            let _refill = slot.refill.lock().await;
            let (lease, spent) = {
                let mut local = lock(&slot.local);
                local.roll(Instant::now());
                (local.lease.clone(), local.spent)
            };
            if lease.is_empty() {
                continue;
            }
            let sent = Instant::now();
            let answer = self
                .0
                .ledger
                .clone()
                .extend_lease(ExtendLeaseRequest {
                    lease_id: lease.clone(),
                    spent_usd_nanos: spent,
                    requested_usd_nanos: 0,
                    minimum_usd_nanos: 0,
                    ttl_ms: ttl,
                })
                .await;
            match answer {
                Ok(answer) => {
                    if let Some(granted) = answer.into_inner().lease {
                        apply(slot, &lease, spent, &granted, sent, ttl);
                    }
                }
                Err(status) => {
                    tracing::warn!(budget.id = %slot.id, code = ?status.code(), "budget lease not extended");
                }
            }
        }
    }

    /// Reports the spend of the slot's retired leases (closing them at the ledger, which keeps the
    /// largest spend reported); forgets each once nothing is in flight on it and its final spend
    /// has been reported.
    async fn report_retired(&self, slot: &Slot) {
        let retired: Vec<(u64, String, i64)> = lock(&slot.local)
            .retired
            .iter()
            .map(|r| (r.epoch, r.lease.clone(), r.spent))
            .collect();
        for (epoch, lease, spent) in retired {
            let answer = self
                .0
                .ledger
                .clone()
                .release_lease(ReleaseLeaseRequest {
                    lease_id: lease,
                    spent_usd_nanos: spent,
                })
                .await;
            let mut local = lock(&slot.local);
            match answer {
                Ok(_) => local
                    .retired
                    .retain(|r| r.epoch != epoch || r.reserved != 0 || r.spent != spent),
                // The ledger does not know it (any more): nothing to report to.
                Err(status) if status.code() == tonic::Code::NotFound => {
                    local.retired.retain(|r| r.epoch != epoch);
                }
                Err(status) => {
                    tracing::warn!(budget.id = %slot.id, code = ?status.code(), "spend of a retired budget lease not reported");
                }
            }
        }
    }

    /// Reloads every `refresh_ms` and reports lease spend every third of the lease lifetime until
    /// `cancel`; then releases every lease (their unspent remainders go back to the budgets).
    pub async fn run(self, cancel: CancellationToken) {
        let report_every =
            Duration::from_millis(u64::from(self.0.config.lease_ttl_ms / 3).max(100));
        let reload_every = Duration::from_millis(self.0.config.refresh_ms);
        let mut report = tokio::time::interval(report_every);
        let mut reload = tokio::time::interval(reload_every);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = reload.tick() => {
                    if let Err(error) = self.reload().await {
                        tracing::warn!(%error, "budgets not reloaded");
                    }
                }
                _ = report.tick() => self.report().await,
            }
        }
        for slot in self.catalog().by_id.values() {
            lock(&slot.local).retire();
        }
        for slot in self.retiring(&self.catalog()) {
            let _refill = slot.refill.lock().await;
            self.report_retired(&slot).await;
        }
    }

    /// The budget error for a router refusal (nothing fitted the allowance): names the hard budget
    /// of the caller with the least left.
    pub fn exceeded_for(&self, principal: &Principal) -> Option<GatewayError> {
        let catalog = self.catalog();
        let now = Instant::now();
        Self::slots_of(&catalog, principal)
            .into_iter()
            .filter(|s| s.hard())
            .min_by_key(|s| lock(&s.local).available(now))
            .map(|slot| exceeded(&slot))
    }
}

/// Takes `want` if available, else as much as is available when that is at least `need`.
/// Returns the amount and the epoch of the lease it was taken from. Nothing (a request with no
/// priced target, e.g. an embedding on an unpriced model) is taken only while something is
/// available: an exhausted hard budget refuses it too.
fn try_take(slot: &Slot, want: i64, need: i64) -> Option<(i64, u64)> {
    let mut local = lock(&slot.local);
    if local.closed {
        // The budget is gone: it limits nothing.
        return Some((want, local.hold(want)));
    }
    let now = Instant::now();
    local.roll(now);
    let available = local.available(now);
    let take = want.min(available);
    if take >= need && (take > 0 || (want == 0 && available > 0)) {
        return Some((take, local.hold(take)));
    }
    None
}

/// `at` (the ledger's wall clock) on this replica's monotonic clock; an instant already past is
/// now. `None` when it is too far ahead to represent.
fn local_instant(at: &prost_types::Timestamp) -> Option<Instant> {
    let now = Instant::now();
    let Ok(seconds) = u64::try_from(at.seconds) else {
        return Some(now);
    };
    let nanos = u32::try_from(at.nanos).unwrap_or(0);
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))?;
    match at.duration_since(SystemTime::now()) {
        Ok(ahead) => now.checked_add(ahead),
        Err(_) => Some(now),
    }
}

/// Applies the ledger's answer about lease `asked` (sent at `sent`, reporting `reported` spent).
fn apply(slot: &Slot, asked: &str, reported: i64, granted: &Lease, sent: Instant, ttl_ms: u32) {
    let mut local = lock(&slot.local);
    let period_start = granted.period_start.as_ref().map(|t| t.seconds);
    if local.lease != asked {
        // The lease was retired while the ledger answered (its period ended here first). Its
        // extension is not used (the grant comes back when it is released); a new lease is.
        if granted.lease_id.is_empty() || granted.lease_id == asked || !local.lease.is_empty() {
            return;
        }
    } else if granted.lease_id != asked {
        if !asked.is_empty() && local.period_start != period_start {
            // The ledger reached the next period first: the old lease is retired as at a reset
            // here, and what was reserved from it settles on it.
            local.retire();
        } else {
            // A new lease of the same period (the old one expired, and the ledger closed it with
            // `reported` spent): what settled since the report was sent, and what the requests
            // still in flight settle, goes on the new lease.
            local.spent = local.spent.saturating_sub(reported).max(0);
        }
    }
    local.lease.clone_from(&granted.lease_id);
    local.granted = granted.granted_usd_nanos;
    local.resets_at = rfc3339(granted.resets_at.as_ref());
    local.period_end = granted.resets_at.as_ref().and_then(local_instant);
    local.period_start = period_start;
    // Expire locally a fifth of the lifetime before the ledger does.
    local.expires = Some(sent + Duration::from_millis(u64::from(ttl_ms) * 4 / 5));
    if local.lease.is_empty() {
        local.granted = 0;
        local.expires = None;
    } else {
        local.denied_until = None;
        if local.closed {
            // Granted to a budget that is gone meanwhile: it goes back.
            local.retire();
        }
    }
}

fn exceeded(slot: &Slot) -> GatewayError {
    GatewayError::BudgetExceeded {
        budget_id: slot.id.clone(),
        scope: slot.scope.clone(),
        limit_usd_nanos: slot.limit(),
        resets_at: lock(&slot.local).resets_at.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_proto::chat::v1::{Attempt, ContentPart, ImageUrl, Message, Role, Usage};

    fn slot(granted: i64) -> Arc<Slot> {
        let slot = Slot::new("b".into(), true, 1000, (0, "UTC".into()), "app:a".into());
        *lock(&slot.local) = Local {
            lease: "l".into(),
            granted,
            expires: Some(Instant::now() + Duration::from_secs(60)),
            ..Local::default()
        };
        Arc::new(slot)
    }

    fn reservation(
        holds: Vec<(Arc<Slot>, i64)>,
        allowance: i64,
        prices: Vec<TargetPrice>,
    ) -> Reservation {
        Reservation {
            holds: holds
                .into_iter()
                .map(|(slot, held)| {
                    let epoch = lock(&slot.local).epoch;
                    Hold { slot, held, epoch }
                })
                .collect(),
            allowance,
            hard: true,
            prompt_tokens: 0,
            max_output_tokens: 0,
            prices: Arc::from(prices),
            settled: false,
        }
    }

    #[test]
    fn the_prompt_bound_counts_bytes_overheads_and_images() {
        let mut request = ChatRequest {
            messages: vec![Message::text(Role::User, "héllo")],
            ..Default::default()
        };
        assert_eq!(prompt_bound(&request), 8 + 6);
        request.messages[0].content.push(ContentPart {
            part: Some(Part::ImageUrl(ImageUrl::default())),
        });
        assert_eq!(prompt_bound(&request), 8 + 6 + IMAGE_TOKENS);
    }

    #[test]
    fn reservations_never_take_more_than_the_lease_and_settle_to_the_true_cost() {
        let slot = slot(100);
        assert_eq!(try_take(&slot, 60, 60), Some((60, 0)));
        // 40 left: a full 60 does not fit, a partial take needs at least `need`.
        assert_eq!(try_take(&slot, 60, 60), None);
        assert_eq!(try_take(&slot, 60, 50), None);
        assert_eq!(try_take(&slot, 60, 30), Some((40, 0)));
        assert_eq!(lock(&slot.local).available(Instant::now()), 0);
        let reservation = reservation(vec![(slot.clone(), 60)], 60, Vec::new());
        reservation.settle(25);
        let local = lock(&slot.local);
        assert_eq!((local.reserved, local.spent), (40, 25));
        assert_eq!(local.available(Instant::now()), 35);
    }

    #[test]
    fn an_unsettled_reservation_is_charged_in_full() {
        let slot = slot(100);
        assert_eq!(try_take(&slot, 70, 70), Some((70, 0)));
        drop(reservation(vec![(slot.clone(), 70)], 70, Vec::new()));
        let local = lock(&slot.local);
        assert_eq!((local.reserved, local.spent), (0, 70));
    }

    #[test]
    fn an_expired_lease_has_nothing_available() {
        let slot = slot(100);
        lock(&slot.local).expires = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(try_take(&slot, 1, 1), None);
    }

    fn lease(id: &str, granted: i64, period_start: i64) -> Lease {
        let in_a_day = SystemTime::now() + Duration::from_secs(86_400);
        let resets_at = in_a_day.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        Lease {
            lease_id: id.into(),
            granted_usd_nanos: granted,
            period_start: Some(prost_types::Timestamp {
                seconds: period_start,
                nanos: 0,
            }),
            resets_at: Some(prost_types::Timestamp {
                seconds: resets_at.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_whose_period_ended_serves_nothing_and_its_reservations_settle_on_it() {
        let slot = slot(100);
        {
            let mut local = lock(&slot.local);
            local.period_start = Some(1_000);
            local.period_end = Some(Instant::now() + Duration::from_secs(60));
        }
        // Reserved before the reset.
        assert_eq!(try_take(&slot, 30, 30), Some((30, 0)));
        let before = reservation(vec![(slot.clone(), 30)], 30, Vec::new());
        // The reset passes: the old lease has nothing left to give, although it is not expired.
        lock(&slot.local).period_end = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(lock(&slot.local).available(Instant::now()), 0);
        assert_eq!(try_take(&slot, 1, 1), None);
        {
            let local = lock(&slot.local);
            assert!(local.lease.is_empty(), "the old lease is retired");
            assert_eq!(local.retired.len(), 1);
            assert_eq!((local.retired[0].reserved, local.reserved), (30, 0));
        }
        // The refill acquires a lease of the new period.
        apply(
            &slot,
            "",
            0,
            &lease("new", 100, 2_000),
            Instant::now(),
            30_000,
        );
        assert_eq!(try_take(&slot, 50, 50), Some((50, 1)));
        // The request reserved before the reset settles on the old lease, not on the new one.
        before.settle(20);
        let local = lock(&slot.local);
        assert_eq!(local.lease, "new");
        assert_eq!((local.spent, local.reserved), (0, 50));
        assert_eq!(local.available(Instant::now()), 50);
        assert_eq!(local.retired[0].lease, "l");
        assert_eq!((local.retired[0].spent, local.retired[0].reserved), (20, 0));
    }

    #[test]
    fn a_new_lease_of_the_next_period_retires_the_old_one_with_its_reservations() {
        // The ledger reached the reset before this replica did: its answer is another period's.
        let slot = slot(100);
        lock(&slot.local).period_start = Some(1_000);
        assert_eq!(try_take(&slot, 40, 40), Some((40, 0)));
        let before = reservation(vec![(slot.clone(), 40)], 40, Vec::new());
        lock(&slot.local).spent = 10;
        apply(
            &slot,
            "l",
            10,
            &lease("next", 100, 2_000),
            Instant::now(),
            30_000,
        );
        assert_eq!(lock(&slot.local).available(Instant::now()), 100);
        before.settle(25);
        let local = lock(&slot.local);
        assert_eq!(
            (local.lease.as_str(), local.spent, local.reserved),
            ("next", 0, 0)
        );
        assert_eq!(local.retired.len(), 1);
        assert_eq!(local.retired[0].lease, "l");
        assert_eq!((local.retired[0].spent, local.retired[0].reserved), (35, 0));
    }

    #[test]
    fn spend_settled_while_an_expired_lease_is_replaced_moves_to_the_new_lease() {
        let slot = slot(100);
        lock(&slot.local).period_start = Some(1_000);
        assert_eq!(try_take(&slot, 50, 50), Some((50, 0)));
        let in_flight = reservation(vec![(slot.clone(), 50)], 50, Vec::new());
        // 30 settled and sent with the extend; 20 more settle while the ledger answers.
        lock(&slot.local).spent = 30;
        in_flight.settle(20);
        // The ledger had closed the lease (with the 30 reported): a new one of the same period.
        apply(
            &slot,
            "l",
            30,
            &lease("m", 100, 1_000),
            Instant::now(),
            30_000,
        );
        let local = lock(&slot.local);
        assert_eq!(local.lease, "m");
        assert_eq!(
            (local.spent, local.reserved),
            (20, 0),
            "the 20 are not lost"
        );
        assert_eq!(local.available(Instant::now()), 80);
        assert!(local.retired.is_empty());
    }

    mod fake {
        use super::*;
        use switchboard_proto::{
            ledger::v1::{
                self as pb,
                budget_service_server::{BudgetService, BudgetServiceServer},
            },
            router::v1::{
                self as rpb,
                router_service_server::{RouterService, RouterServiceServer},
            },
        };
        use tonic::{Request, Response, Status};

        /// What the fake ledger was asked, and what it answers.
        #[derive(Default)]
        pub struct State {
            pub budgets: Vec<pb::Budget>,
            /// Granted per AcquireLease (0: refused).
            pub grant: i64,
            pub leases: u32,
            pub list_calls: u32,
            pub acquired: u32,
            pub released: Vec<(String, i64)>,
            /// The ledger answers nothing (UNAVAILABLE).
            pub down: bool,
        }

        #[derive(Clone, Default)]
        pub struct Fake(pub Arc<Mutex<State>>);

        impl Fake {
            pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
                self.0.lock().unwrap()
            }

            /// Serves the fake ledger and router; returns the enforcer talking to them.
            pub async fn budgets(&self, config: BudgetsConfig) -> Budgets {
                self.budgets_saving(config, None).await
            }

            /// [`Fake::budgets`], keeping its catalog in `catalog_file`.
            pub async fn budgets_saving(
                &self,
                config: BudgetsConfig,
                catalog_file: Option<std::path::PathBuf>,
            ) -> Budgets {
                let listener = switchboard_grpc::bind("127.0.0.1:0").await.unwrap();
                let url = switchboard_grpc::url_of(listener.local_addr().unwrap());
                let routes = tonic::service::Routes::new(BudgetServiceServer::new(self.clone()))
                    .add_service(RouterServiceServer::new(self.clone()));
                tokio::spawn(switchboard_grpc::serve(
                    listener,
                    routes,
                    &[],
                    std::future::pending(),
                ));
                let channel = || switchboard_grpc::channel(&url).unwrap();
                // No test depends on the unknown-route throttle's clock.
                let every = Duration::from_secs(3_600);
                Budgets::build(config, channel(), channel(), every, catalog_file)
            }
        }

        pub fn budget(id: &str, app: &str, limit: i64) -> pb::Budget {
            pb::Budget {
                id: id.into(),
                scope: Some(pb::BudgetScope {
                    kind: BudgetScopeKind::App as i32,
                    id: app.into(),
                }),
                limit_usd_nanos: limit,
                enforcement: BudgetEnforcement::Hard as i32,
                ..Default::default()
            }
        }

        fn lease(state: &mut State) -> pb::Lease {
            if state.grant == 0 {
                return pb::Lease::default();
            }
            state.leases += 1;
            pb::Lease {
                lease_id: format!("lease-{}", state.leases),
                granted_usd_nanos: state.grant,
                ..Default::default()
            }
        }

        #[tonic::async_trait]
        impl BudgetService for Fake {
            async fn create_budget(
                &self,
                _: Request<pb::CreateBudgetRequest>,
            ) -> Result<Response<pb::CreateBudgetResponse>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn get_budget(
                &self,
                _: Request<pb::GetBudgetRequest>,
            ) -> Result<Response<pb::GetBudgetResponse>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn update_budget(
                &self,
                _: Request<pb::UpdateBudgetRequest>,
            ) -> Result<Response<pb::UpdateBudgetResponse>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn list_budgets(
                &self,
                _: Request<pb::ListBudgetsRequest>,
            ) -> Result<Response<pb::ListBudgetsResponse>, Status> {
                let mut state = self.state();
                if state.down {
                    return Err(Status::unavailable("ledger down"));
                }
                state.list_calls += 1;
                Ok(Response::new(pb::ListBudgetsResponse {
                    budgets: state.budgets.clone(),
                }))
            }
            async fn get_budget_status(
                &self,
                _: Request<pb::GetBudgetStatusRequest>,
            ) -> Result<Response<pb::GetBudgetStatusResponse>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn acquire_lease(
                &self,
                _: Request<pb::AcquireLeaseRequest>,
            ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
                let mut state = self.state();
                if state.down {
                    return Err(Status::unavailable("ledger down"));
                }
                state.acquired += 1;
                Ok(Response::new(pb::AcquireLeaseResponse {
                    lease: Some(lease(&mut state)),
                }))
            }
            async fn extend_lease(
                &self,
                request: Request<pb::ExtendLeaseRequest>,
            ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
                let request = request.into_inner();
                let state = self.state();
                Ok(Response::new(pb::ExtendLeaseResponse {
                    lease: Some(pb::Lease {
                        lease_id: request.lease_id,
                        granted_usd_nanos: state.grant,
                        ..Default::default()
                    }),
                }))
            }
            async fn release_lease(
                &self,
                request: Request<pb::ReleaseLeaseRequest>,
            ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
                let request = request.into_inner();
                self.state()
                    .released
                    .push((request.lease_id, request.spent_usd_nanos));
                Ok(Response::new(pb::ReleaseLeaseResponse {}))
            }
            async fn get_prices(
                &self,
                _: Request<pb::GetPricesRequest>,
            ) -> Result<Response<pb::GetPricesResponse>, Status> {
                // One nano-USD per token.
                let rates = pb::TokenRates {
                    input: 1_000_000,
                    output: 1_000_000,
                    ..Default::default()
                };
                Ok(Response::new(pb::GetPricesResponse {
                    prices: vec![pb::TargetPrice {
                        provider: "p".into(),
                        model: "priced".into(),
                        base: Some(rates),
                        ..Default::default()
                    }],
                }))
            }
            async fn acquire_rate_slice(
                &self,
                _: Request<pb::AcquireRateSliceRequest>,
            ) -> Result<Response<pb::AcquireRateSliceResponse>, Status> {
                Err(Status::unimplemented(""))
            }
        }

        #[tonic::async_trait]
        impl RouterService for Fake {
            type RouteStreamStream = tokio_stream::Empty<Result<rpb::RouteStreamResponse, Status>>;
            async fn route(
                &self,
                _: Request<rpb::RouteRequest>,
            ) -> Result<Response<rpb::RouteResponse>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn route_stream(
                &self,
                _: Request<rpb::RouteStreamRequest>,
            ) -> Result<Response<Self::RouteStreamStream>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn list_models(
                &self,
                _: Request<rpb::ListModelsRequest>,
            ) -> Result<Response<rpb::ListModelsResponse>, Status> {
                let target = |model: &str| pb::PriceTarget {
                    provider: "p".into(),
                    model: model.into(),
                };
                Ok(Response::new(rpb::ListModelsResponse {
                    routes: vec![
                        rpb::RouteTargets {
                            route: "priced".into(),
                            targets: vec![target("priced")],
                        },
                        rpb::RouteTargets {
                            route: "unpriced".into(),
                            targets: vec![target("unpriced")],
                        },
                    ],
                    ..Default::default()
                }))
            }
            async fn embed(
                &self,
                _: Request<rpb::EmbedRequest>,
            ) -> Result<Response<rpb::EmbedResponse>, Status> {
                Err(Status::unimplemented(""))
            }
        }
    }

    fn principal(app: &str) -> Principal {
        Principal {
            key_id: "k".into(),
            app: app.into(),
            team: "t".into(),
            models: Default::default(),
            tags: Default::default(),
        }
    }

    fn enabled() -> BudgetsConfig {
        BudgetsConfig {
            enabled: true,
            ..BudgetsConfig::default()
        }
    }

    #[tokio::test]
    async fn a_changed_budget_reports_what_its_requests_in_flight_settle_on_its_old_lease() {
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "a", 1_000_000)];
            state.grant = 100_000;
        }
        let budgets = fake.budgets(enabled()).await;
        let mut request = ChatRequest {
            model: "priced".into(),
            messages: vec![Message::text(Role::User, "hello")],
            ..Default::default()
        };
        let in_flight = budgets
            .reserve(&principal("a"), &mut request, true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fake.state().acquired, 1);
        // The limit changes while the request is in flight.
        fake.state().budgets = vec![fake::budget("b", "a", 2_000_000)];
        budgets.reload().await.unwrap();
        assert_eq!(fake.state().released, vec![("lease-1".to_owned(), 0)]);
        in_flight.settle(25);
        budgets.report().await;
        assert_eq!(
            fake.state().released.last(),
            Some(&("lease-1".to_owned(), 25)),
            "what settled after the change is reported on the old lease"
        );
        let catalog = budgets.catalog();
        let slot = catalog.by_id.get("b").unwrap();
        assert!(lock(&slot.local).retired.is_empty());
        assert_eq!(slot.limit(), 2_000_000);
    }

    #[tokio::test]
    async fn a_budget_whose_period_or_time_zone_changed_retires_its_lease() {
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "a", 1_000_000)];
            state.grant = 100_000;
        }
        let budgets = fake.budgets(enabled()).await;
        let reserve = || async {
            let mut request = ChatRequest {
                model: "priced".into(),
                messages: vec![Message::text(Role::User, "hello")],
                ..Default::default()
            };
            budgets
                .reserve(&principal("a"), &mut request, true)
                .await
                .unwrap()
                .unwrap()
                .settle(10);
        };
        reserve().await;
        let changes: [fn(&mut switchboard_proto::ledger::v1::Budget); 2] = [
            |b| b.time_zone = "Asia/Tokyo".into(),
            |b| b.period = switchboard_proto::ledger::v1::BudgetPeriod::Week as i32,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            change(&mut fake.state().budgets[0]);
            budgets.reload().await.unwrap();
            let lease = format!("lease-{}", i + 1);
            assert_eq!(
                fake.state().released.last(),
                Some(&(lease, 10)),
                "change {i}: the lease taken under the old period is given back"
            );
            // The next request leases under the new period.
            reserve().await;
            assert_eq!(fake.state().acquired, 2 + i as u32);
        }
        // Unchanged: the lease stays.
        budgets.reload().await.unwrap();
        assert_eq!(fake.state().released.len(), 2);
    }

    #[tokio::test]
    async fn an_exhausted_hard_budget_refuses_requests_without_a_priced_target() {
        let fake = fake::Fake::default();
        fake.state().budgets = vec![fake::budget("b", "a", 1_000_000)];
        let budgets = fake.budgets(enabled()).await;
        let request = || ChatRequest {
            model: "unpriced".into(),
            messages: vec![Message::text(Role::User, "hello")],
            ..Default::default()
        };
        // The ledger grants nothing: the budget is spent.
        for chat in [false, true] {
            let refused = budgets.reserve(&principal("a"), &mut request(), chat).await;
            assert!(
                matches!(&refused, Err(GatewayError::BudgetExceeded { budget_id, .. }) if budget_id == "b"),
                "chat {chat}: {refused:?}"
            );
        }
        assert_eq!(fake.state().acquired, 1, "the refusal is remembered");
        // With room left, the same requests pass with a zero allowance (the router sends no
        // unpriced target of a chat under a budget; an embedding settles at its price, none).
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "a", 1_000_000)];
            state.grant = 100_000;
        }
        let budgets = fake.budgets(enabled()).await;
        for chat in [false, true] {
            let reservation = budgets
                .reserve(&principal("a"), &mut request(), chat)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reservation.allowance().unwrap().allowance_usd_nanos, 0);
        }
        // A soft budget alone sends the router no allowance (it never blocks, so any target,
        // priced or not, may serve).
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            let mut soft = fake::budget("b", "a", 1_000_000);
            soft.enforcement = BudgetEnforcement::Soft as i32;
            state.budgets = vec![soft];
            state.grant = 100_000;
        }
        let budgets = fake.budgets(enabled()).await;
        let reservation = budgets
            .reserve(&principal("a"), &mut request(), true)
            .await
            .unwrap()
            .unwrap();
        assert!(reservation.allowance().is_none());
    }

    #[tokio::test]
    async fn a_raised_limit_ends_a_refusal_under_the_old_one() {
        let fake = fake::Fake::default();
        fake.state().budgets = vec![fake::budget("b", "a", 1_000_000)];
        let config = BudgetsConfig {
            denied_backoff_ms: 3_600_000,
            ..enabled()
        };
        let budgets = fake.budgets(config).await;
        let reserve = || {
            let mut request = ChatRequest {
                model: "priced".into(),
                messages: vec![Message::text(Role::User, "hello")],
                ..Default::default()
            };
            let budgets = budgets.clone();
            async move { budgets.reserve(&principal("a"), &mut request, true).await }
        };
        assert!(matches!(
            reserve().await,
            Err(GatewayError::BudgetExceeded { .. })
        ));
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "a", 2_000_000)];
            state.grant = 100_000;
        }
        budgets.reload().await.unwrap();
        assert!(reserve().await.unwrap().is_some());
        assert_eq!(fake.state().acquired, 2);
    }

    #[tokio::test]
    async fn unknown_routes_reload_the_catalog_at_most_once_per_interval() {
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "a", 1_000_000)];
            state.grant = 100_000;
        }
        let budgets = fake.budgets(enabled()).await;
        let reserve = |model: String| {
            let budgets = budgets.clone();
            async move {
                let mut request = ChatRequest {
                    model,
                    messages: vec![Message::text(Role::User, "hello")],
                    ..Default::default()
                };
                budgets
                    .reserve(&principal("a"), &mut request, true)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        reserve("priced".into()).await;
        assert_eq!(
            fake.state().list_calls,
            1,
            "the first request loads the catalog"
        );
        // Made-up model names right after a reload use the catalog as it is.
        for i in 0..5 {
            reserve(format!("made-up-{i}")).await;
        }
        assert_eq!(fake.state().list_calls, 1);
        // Once the interval has passed, one unknown route reloads it, and only one.
        *budgets.0.reloaded.lock().unwrap() = None;
        futures::future::join_all((0..5).map(|i| reserve(format!("new-{i}")))).await;
        assert_eq!(fake.state().list_calls, 2);
    }

    #[tokio::test]
    async fn a_replica_starting_while_the_ledger_is_down_uses_the_catalog_saved_last() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("catalog").join("budget-catalog.pb");
        let fake = fake::Fake::default();
        {
            let mut state = fake.state();
            state.budgets = vec![fake::budget("b", "capped", 1_000_000)];
            state.grant = 100_000;
        }
        let reserve = |budgets: Budgets, app: &'static str| async move {
            let mut request = ChatRequest {
                model: "priced".into(),
                messages: vec![Message::text(Role::User, "hello")],
                ..Default::default()
            };
            budgets.reserve(&principal(app), &mut request, true).await
        };
        // A replica reads the catalog and keeps it.
        let first = fake.budgets_saving(enabled(), Some(file.clone())).await;
        assert!(reserve(first, "capped").await.unwrap().is_some());
        assert!(file.exists());
        // The ledger goes down; a replica that starts now serves the callers the saved catalog
        // gives no budget, and still refuses a hard-budgeted one (no lease can be had).
        fake.state().down = true;
        let second = fake.budgets_saving(enabled(), Some(file.clone())).await;
        assert!(reserve(second.clone(), "free").await.unwrap().is_none());
        assert!(matches!(
            reserve(second, "capped").await,
            Err(GatewayError::DependencyDown { service: "ledger" })
        ));
        // Without a saved catalog nobody's budgets are known: everyone is refused, as before.
        let unsaved = fake
            .budgets_saving(enabled(), Some(dir.path().join("none.pb")))
            .await;
        assert!(matches!(
            reserve(unsaved, "free").await,
            Err(GatewayError::DependencyDown { service: "ledger" })
        ));
        // A catalog file that does not read is no catalog.
        std::fs::write(&file, b"\xff\xff not protobuf").unwrap();
        let garbled = fake.budgets_saving(enabled(), Some(file)).await;
        assert!(reserve(garbled, "free").await.is_err());
    }

    #[test]
    fn the_cost_of_a_route_prices_each_attempt_at_its_target() {
        let price = |provider: &str, input| TargetPrice {
            provider: provider.into(),
            model: "m".into(),
            base: Some(switchboard_proto::ledger::v1::TokenRates {
                input,
                output: input,
                ..Default::default()
            }),
            ..Default::default()
        };
        let reservation = reservation(
            Vec::new(),
            1_000_000,
            vec![price("a", 1_000_000_000), price("b", 2_000_000_000)],
        );
        let usage = |tokens| Usage {
            prompt_tokens: tokens,
            ..Default::default()
        };
        let attempt = |provider: &str, tokens| Attempt {
            provider: provider.into(),
            model: "m".into(),
            usage: Some(usage(tokens)),
            ..Default::default()
        };
        let route = RouteInfo {
            attempts: vec![attempt("a", 10), attempt("b", 10)],
            ..Default::default()
        };
        assert_eq!(reservation.cost_of(&route), 10 * 1000 + 10 * 2000);
        // Tokens on an unpriced target cost the whole allowance.
        let route = RouteInfo {
            attempts: vec![attempt("c", 1)],
            ..Default::default()
        };
        assert_eq!(reservation.cost_of(&route), 1_000_000);
    }
}
