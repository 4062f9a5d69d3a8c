//! Deployments — one (provider, endpoint, key, model) each — and the choice among a target's
//! deployments: skip keys on cooldown or with an open breaker, keep each key under its configured
//! RPM/TPM with a local budget, and prefer the key with the most headroom.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    breaker::{Blocked, Breaker, Permit},
    metrics::Metrics,
    provider::ProviderClient,
};

/// One-second slots of the budget window: 61 of them cover every 60-second window that ends now.
const SLOTS: usize = 61;

#[derive(Debug)]
struct Window {
    origin: Instant,
    head: u64,
    requests: [u32; SLOTS],
    tokens: [u64; SLOTS],
    request_sum: u64,
    token_sum: u64,
}

impl Window {
    fn advance(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        if second <= self.head {
            return;
        }
        if second - self.head >= SLOTS as u64 {
            self.requests = [0; SLOTS];
            self.tokens = [0; SLOTS];
            self.request_sum = 0;
            self.token_sum = 0;
        } else {
            for s in self.head + 1..=second {
                let i = (s % SLOTS as u64) as usize;
                self.request_sum -= u64::from(self.requests[i]);
                self.token_sum -= self.tokens[i];
                self.requests[i] = 0;
                self.tokens[i] = 0;
            }
        }
        self.head = second;
    }

    /// When the oldest used slot leaves the window.
    fn next_free(&self) -> Instant {
        let oldest = self.head.saturating_sub(SLOTS as u64 - 1);
        let freed = (oldest..=self.head)
            .find(|s| {
                let i = (s % SLOTS as u64) as usize;
                self.requests[i] > 0 || self.tokens[i] > 0
            })
            .unwrap_or(self.head);
        self.origin + Duration::from_secs(freed + SLOTS as u64)
    }
}

/// A key's local rate budget: at most `rpm` requests and `tpm` tokens in any 60 seconds (a
/// sliding window of one-second slots, so a burst never exceeds the configured limit).
#[derive(Debug)]
pub struct Budget {
    rpm: u64,
    tpm: u64,
    window: Mutex<Window>,
}

impl Budget {
    /// A budget; `None` when neither limit is set.
    pub fn new(rpm: u32, tpm: u32) -> Option<Budget> {
        (rpm > 0 || tpm > 0).then(|| Budget {
            rpm: u64::from(rpm),
            tpm: u64::from(tpm),
            window: Mutex::new(Window {
                origin: Instant::now(),
                head: 0,
                requests: [0; SLOTS],
                tokens: [0; SLOTS],
                request_sum: 0,
                token_sum: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fits(&self, window: &Window, tokens: u64) -> bool {
        (self.rpm == 0 || window.request_sum < self.rpm)
            && (self.tpm == 0 || window.token_sum + tokens <= self.tpm)
    }

    /// Headroom in permille after one more request of `tokens`, or when room frees up.
    pub fn headroom(&self, now: Instant, tokens: u64) -> Result<u32, Instant> {
        let mut window = self.lock();
        window.advance(now);
        if !self.fits(&window, tokens) {
            return Err(window.next_free());
        }
        let left = |limit: u64, used: u64| {
            (limit.saturating_sub(used) * 1000)
                .checked_div(limit)
                .map_or(1000, |permille| permille as u32)
        };
        Ok(left(self.rpm, window.request_sum + 1).min(left(self.tpm, window.token_sum + tokens)))
    }

    /// Takes one request of `tokens` from the budget, if it fits.
    pub fn take(&self, now: Instant, tokens: u64) -> bool {
        let mut window = self.lock();
        window.advance(now);
        if !self.fits(&window, tokens) {
            return false;
        }
        let i = (window.head % SLOTS as u64) as usize;
        window.requests[i] += 1;
        window.tokens[i] += tokens;
        window.request_sum += 1;
        window.token_sum += tokens;
        true
    }

    /// Takes over the window of `old` (a reload that changed the limits).
    pub fn carry_from(&self, old: &Budget) {
        let old = old.lock();
        let mut window = self.lock();
        window.origin = old.origin;
        window.head = old.head;
        window.requests = old.requests;
        window.tokens = old.tokens;
        window.request_sum = old.request_sum;
        window.token_sum = old.token_sum;
    }

    /// Charges the tokens a request used beyond its estimate.
    pub fn settle(&self, now: Instant, estimated: u64, actual: u64) {
        if actual <= estimated || self.tpm == 0 {
            return;
        }
        let mut window = self.lock();
        window.advance(now);
        let i = (window.head % SLOTS as u64) as usize;
        window.tokens[i] += actual - estimated;
        window.token_sum += actual - estimated;
    }
}

/// One (provider, endpoint, key, model): its client, breaker, budget and metrics.
#[derive(Debug)]
pub struct Deployment {
    /// The provider client with this deployment's endpoint and key.
    pub client: Arc<ProviderClient>,
    /// `provider/model` of the target.
    pub target: String,
    /// Provider name.
    pub provider: String,
    /// Provider model.
    pub model: String,
    /// Key alias (`default`: the provider's own key).
    pub alias: String,
    /// Alias of the configured key, empty for the provider's own key (attempts and route info).
    pub key_alias: String,
    /// Name in attempts: `provider/model`, or `provider/model#alias` for a configured key.
    pub label: String,
    /// Circuit breaker and cooldown.
    pub breaker: Breaker,
    /// RPM/TPM budget, if limited.
    pub budget: Option<Budget>,
    in_flight: AtomicU32,
    /// Request metrics (shared with the deployment's successor after a reload).
    pub metrics: Arc<Metrics>,
}

impl Deployment {
    /// A deployment.
    pub fn new(
        client: Arc<ProviderClient>,
        provider: &str,
        model: &str,
        alias: Option<&str>,
        breaker: Breaker,
        budget: Option<Budget>,
    ) -> Self {
        let target = format!("{provider}/{model}");
        let label = match alias {
            Some(alias) => format!("{target}#{alias}"),
            None => target.clone(),
        };
        Deployment {
            client,
            target,
            provider: provider.to_owned(),
            model: model.to_owned(),
            alias: alias.unwrap_or("default").to_owned(),
            key_alias: alias.unwrap_or_default().to_owned(),
            label,
            breaker,
            budget,
            in_flight: AtomicU32::new(0),
            metrics: Arc::default(),
        }
    }

    /// Takes over the breaker, cooldown, budget window and metrics of `old`, the same deployment
    /// before a configuration reload.
    pub fn carry_state_from(&mut self, old: &Deployment) {
        self.breaker.carry_from(&old.breaker);
        if let (Some(budget), Some(old)) = (&self.budget, &old.budget) {
            budget.carry_from(old);
        }
        self.metrics = old.metrics.clone();
    }

    /// Attempts in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU32, &'a AtomicU32);

impl<'a> InFlight<'a> {
    /// Counts one more in flight on the deployment and on `target`'s counter.
    pub fn new(deployment: &'a Deployment, target: &'a AtomicU32) -> Self {
        deployment.in_flight.fetch_add(1, Relaxed);
        target.fetch_add(1, Relaxed);
        InFlight(&deployment.in_flight, target)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
        self.1.fetch_sub(1, Relaxed);
    }
}

/// The outcome of choosing a deployment.
#[derive(Debug)]
pub enum Pick<'a> {
    /// This deployment may take the request now.
    Ready {
        /// Index among the target's deployments.
        index: usize,
        /// The breaker permit (resolve it with the outcome).
        permit: Permit<'a>,
    },
    /// None can now; `code` says why, `until` when the first one might.
    Blocked {
        /// `KEY_COOLDOWN`, `RATE_BUDGET_EXHAUSTED`, `CIRCUIT_OPEN` or `NO_USABLE_KEY`.
        code: &'static str,
        /// When one might be usable again, if known.
        until: Option<Instant>,
    },
}

/// Chooses among `deployments` (skipping the `excluded` bit set) for a request of `tokens`
/// estimated tokens: the one with the most budget headroom, then the fewest in flight, then the
/// next in rotation. Takes its breaker permit and budget.
pub fn pick<'a>(
    deployments: &'a [Arc<Deployment>],
    mut excluded: u64,
    tokens: u64,
    now: Instant,
    rotation: &AtomicUsize,
) -> Pick<'a> {
    let n = deployments.len();
    let start = if n > 1 {
        rotation.fetch_add(1, Relaxed) % n
    } else {
        0
    };
    let mut blocked: Option<(&'static str, Option<Instant>)> = None;
    let mut note = |code: &'static str, until: Option<Instant>| {
        blocked = Some(match blocked {
            None => (code, until),
            Some((old_code, old_until)) => match (old_until, until) {
                (Some(a), Some(b)) if b < a => (code, until),
                (None, Some(_)) => (code, until),
                _ => (old_code, old_until),
            },
        });
    };
    for _ in 0..=n {
        let mut best: Option<(usize, u32, u32)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if i < 64 && excluded & (1 << i) != 0 {
                continue;
            }
            let deployment = &deployments[i];
            if let Err((reason, until)) = deployment.breaker.check(now) {
                note(reason.code(), until);
                continue;
            }
            let headroom = match &deployment.budget {
                None => 1000,
                Some(budget) => match budget.headroom(now, tokens) {
                    Ok(headroom) => headroom,
                    Err(until) => {
                        note("RATE_BUDGET_EXHAUSTED", Some(until));
                        continue;
                    }
                },
            };
            let in_flight = deployment.in_flight();
            let better =
                best.is_none_or(|(_, h, f)| headroom > h || (headroom == h && in_flight < f));
            if better {
                best = Some((i, headroom, in_flight));
            }
        }
        let Some((index, _, _)) = best else {
            let (code, until) = blocked.unwrap_or(("NO_USABLE_KEY", None));
            return Pick::Blocked { code, until };
        };
        let deployment = &deployments[index];
        // Another request may have taken the probe or the last budget meanwhile: choose again.
        let Some(permit) = deployment.breaker.acquire(now) else {
            note(Blocked::Open.code(), None);
            excluded |= 1 << index;
            continue;
        };
        if let Some(budget) = &deployment.budget
            && !budget.take(now, tokens)
        {
            drop(permit);
            excluded |= 1 << index;
            continue;
        }
        return Pick::Ready { index, permit };
    }
    let (code, until) = blocked.unwrap_or(("NO_USABLE_KEY", None));
    Pick::Blocked { code, until }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{config::ProviderConfig, route_config::BreakerConfig};

    fn deployment(alias: &str, rpm: u32, tpm: u32) -> Arc<Deployment> {
        let client = ProviderClient::new(
            "p",
            &ProviderConfig::openai("http://127.0.0.1:1/v1", None),
            Duration::from_secs(1),
        )
        .unwrap();
        Arc::new(Deployment::new(
            Arc::new(client),
            "p",
            "m",
            Some(alias),
            Breaker::new(&BreakerConfig::default()),
            Budget::new(rpm, tpm),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn key_balancing_stays_under_each_keys_rpm_and_adds_up() {
        let deployments = vec![deployment("a", 30, 0), deployment("b", 60, 0)];
        let rotation = AtomicUsize::new(0);
        let start = Instant::now();
        let mut served: Vec<Vec<Duration>> = vec![Vec::new(), Vec::new()];
        let mut refused = 0;
        // Demand of 4 requests per second (240 RPM) for 3 minutes against 90 RPM of keys.
        for _ in 0..720 {
            let now = Instant::now();
            match pick(&deployments, 0, 10, now, &rotation) {
                Pick::Ready { index, permit } => {
                    permit.finish(now, Ok(()));
                    served[index].push(now - start);
                }
                Pick::Blocked { code, until } => {
                    assert_eq!(code, "RATE_BUDGET_EXHAUSTED");
                    assert!(until.unwrap() > now);
                    refused += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        for (times, rpm) in served.iter().zip([30, 60]) {
            for (i, t) in times.iter().enumerate() {
                let in_window = times[i..]
                    .iter()
                    .take_while(|u| **u < *t + Duration::from_secs(60))
                    .count();
                assert!(in_window <= rpm, "{in_window} requests in 60 s, rpm {rpm}");
            }
        }
        // Throughput adds up: close to 90 per minute over 3 minutes.
        let total = served[0].len() + served[1].len();
        assert!((250..=270).contains(&total), "served {total}");
        assert!(served[1].len() > served[0].len());
        assert_eq!(total + refused, 720);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_with_headroom_win_and_cooled_down_keys_are_skipped() {
        let deployments = vec![deployment("a", 10, 0), deployment("b", 10, 1_000)];
        let rotation = AtomicUsize::new(0);
        let now = Instant::now();
        // A heavy request fits only key a's unlimited TPM... and b's 1000.
        for _ in 0..5 {
            let Pick::Ready { index, permit } = pick(&deployments, 0, 100, now, &rotation) else {
                panic!("blocked");
            };
            permit.finish(now, Ok(()));
            assert!(index < 2);
        }
        // Key a is rate limited: every pick goes to b.
        let Pick::Ready { index: 0, permit } = pick(&deployments, 0b10, 1, now, &rotation) else {
            panic!("a expected");
        };
        let limited = crate::provider::ProviderError::RateLimited {
            status: 429,
            retry_after: Some(Duration::from_secs(30)),
        };
        permit.finish(now, Err(&limited));
        for _ in 0..3 {
            let Pick::Ready { index, permit } = pick(&deployments, 0, 1, now, &rotation) else {
                panic!("blocked");
            };
            assert_eq!(index, 1);
            permit.finish(now, Ok(()));
        }
        // With b excluded (say, it failed authentication) the request must wait for a.
        match pick(&deployments, 0b10, 1, now, &rotation) {
            Pick::Blocked { code, until } => {
                assert_eq!(code, "KEY_COOLDOWN");
                assert_eq!(until, Some(now + Duration::from_secs(30)));
            }
            Pick::Ready { .. } => panic!("a is cooling down"),
        }
        match pick(&deployments, 0b11, 1, now, &rotation) {
            Pick::Blocked { code, until } => assert_eq!((code, until), ("NO_USABLE_KEY", None)),
            Pick::Ready { .. } => panic!("all excluded"),
        }
    }
}
