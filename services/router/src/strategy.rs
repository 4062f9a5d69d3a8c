//! Routing strategies: which targets of a route a request may use and in which order, from the
//! route's conditional rules, its strategy and each target's capabilities.

use std::{
    collections::HashMap,
    sync::{
        OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use rand::Rng;
use switchboard_proto::{
    chat::v1::{ChatRequest, content_part::Part},
    router::v1::Caller,
};
use tokio::time::Instant;

use crate::route_config::{RuleConfig, Strategy};

/// The tag carrying the task-type hint for rules (`task = "classification"`).
pub const TASK_TAG: &str = "task";

/// Rough prompt tokens counted for one image input.
const IMAGE_TOKENS: u64 = 765;

/// What a request needs from a target.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// Estimated prompt tokens (about four characters a token, plus framing).
    pub prompt_tokens: u64,
    /// Estimated completion tokens (`max_tokens`, else as many as the prompt).
    pub completion_tokens: u64,
    /// The request defines tools.
    pub tools: bool,
    /// The request contains image input.
    pub images: bool,
}

impl Needs {
    /// Estimates what `request` needs, without allocating.
    pub fn of(request: &ChatRequest) -> Needs {
        let mut chars = 0u64;
        let mut images = 0u64;
        for message in &request.messages {
            chars += 16 + message.name.len() as u64;
            for part in &message.content {
                match &part.part {
                    Some(Part::Text(text)) => chars += text.len() as u64,
                    Some(Part::ImageUrl(_)) => images += 1,
                    None => {}
                }
            }
            for call in &message.tool_calls {
                chars += (call.name.len() + call.arguments_json.len()) as u64;
            }
        }
        for tool in &request.tools {
            chars += (tool.name.len() + tool.description.len() + tool.parameters_json.len()) as u64;
        }
        let prompt_tokens = chars.div_ceil(4) + images * IMAGE_TOKENS;
        let completion_tokens = request
            .sampling
            .as_ref()
            .and_then(|s| s.max_tokens)
            .map_or(prompt_tokens, u64::from);
        Needs {
            prompt_tokens,
            completion_tokens,
            tools: !request.tools.is_empty(),
            images: images > 0,
        }
    }

    /// Tokens charged against a key's TPM budget up front.
    pub fn budget_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a target can take, and its price.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Context window, if known.
    pub context_window: Option<u32>,
    /// Takes tool definitions.
    pub tools: bool,
    /// Takes image input.
    pub images: bool,
    /// Input and output USD nanos per million tokens.
    pub price: Option<(i64, i64)>,
}

impl Capabilities {
    /// Why this target cannot serve `needs` (reason code, message), if it cannot.
    pub fn refuses(&self, needs: &Needs) -> Option<(&'static str, String)> {
        if let Some(window) = self.context_window
            && needs.prompt_tokens > u64::from(window)
        {
            return Some((
                "CONTEXT_WINDOW_TOO_SMALL",
                format!(
                    "skipped: about {} prompt tokens exceed the context window of {window}",
                    needs.prompt_tokens
                ),
            ));
        }
        if needs.tools && !self.tools {
            return Some((
                "NO_TOOL_SUPPORT",
                "skipped: the request has tools and the model takes none".to_owned(),
            ));
        }
        if needs.images && !self.images {
            return Some((
                "NO_IMAGE_INPUT",
                "skipped: the request has images and the model takes none".to_owned(),
            ));
        }
        None
    }

    /// Estimated cost in USD nanos (integer), `None` when unpriced.
    fn cost(&self, needs: &Needs) -> Option<u128> {
        let (input, output) = self.price?;
        let input = u128::try_from(input).ok()?;
        let output = u128::try_from(output).ok()?;
        Some(
            (u128::from(needs.prompt_tokens) * input
                + u128::from(needs.completion_tokens) * output)
                / 1_000_000,
        )
    }
}

/// A latency older than this is measured again: one request tries the target first, so a target
/// that was slow and recovered wins its traffic back.
const LATENCY_REFRESH: Duration = Duration::from_secs(30);

/// Milliseconds on a process-wide monotonic clock (tokio's, so paused-time tests control it).
fn clock_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(origin).as_millis() as u64
}

/// Live statistics of a target (shared by every route that uses the same provider model).
#[derive(Debug, Default)]
pub struct TargetStats {
    /// EWMA of attempt latency in microseconds (0: not measured yet).
    ewma_us: AtomicU64,
    /// When the EWMA was last refreshed or claimed for a refresh ([`clock_ms`]).
    refreshed_ms: AtomicU64,
    /// Attempts in flight.
    pub in_flight: AtomicU32,
}

impl TargetStats {
    /// The latency to order by: 0 (measure first) when unmeasured or due for a refresh.
    fn latency_key(&self, now_ms: u64) -> u64 {
        let ewma = self.ewma_us.load(Relaxed);
        let refreshed = self.refreshed_ms.load(Relaxed);
        if now_ms.saturating_sub(refreshed) >= LATENCY_REFRESH.as_millis() as u64 {
            0
        } else {
            ewma
        }
    }

    /// Folds one observed latency into the EWMA (weight 1/4; races lose a sample, harmlessly).
    pub fn observe(&self, elapsed: Duration) {
        self.refreshed_ms.store(clock_ms(), Relaxed);
        let sample = (elapsed.as_micros() as u64).max(1);
        let old = self.ewma_us.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 3 + sample) / 4
        };
        self.ewma_us.store(new.max(1), Relaxed);
    }
}

/// The view of a target that ordering needs.
pub trait Candidate {
    /// Weight under the weighted strategy.
    fn weight(&self) -> u32;
    /// Capabilities and price.
    fn capabilities(&self) -> &Capabilities;
    /// Live statistics.
    fn stats(&self) -> &TargetStats;
}

/// A compiled rule: conditions and the indexes of its targets.
#[derive(Debug, Clone)]
pub struct Rule {
    app: Option<String>,
    team: Option<String>,
    task: Option<String>,
    tags: Vec<(String, String)>,
    /// Target indexes, in order.
    pub targets: Vec<usize>,
    /// Strategy override.
    pub strategy: Option<Strategy>,
}

impl Rule {
    /// Compiles `config`; target names resolve through `index_of` (validated beforehand).
    pub fn new(config: &RuleConfig, index_of: &HashMap<String, usize>) -> Rule {
        Rule {
            app: config.app.clone(),
            team: config.team.clone(),
            task: config.task.clone(),
            tags: config
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            targets: config
                .targets
                .iter()
                .filter_map(|name| index_of.get(name).copied())
                .collect(),
            strategy: config.strategy,
        }
    }

    /// Whether every condition holds for this caller and request.
    pub fn matches(&self, caller: &Caller, request: &ChatRequest) -> bool {
        let tag = |key: &str| request.tags.get(key).map(String::as_str);
        self.app.as_deref().is_none_or(|app| app == caller.app)
            && self.team.as_deref().is_none_or(|team| team == caller.team)
            && self
                .task
                .as_deref()
                .is_none_or(|task| tag(TASK_TAG) == Some(task))
            && self
                .tags
                .iter()
                .all(|(key, value)| tag(key) == Some(value.as_str()))
    }
}

/// Orders `candidates` (indexes into `targets`) in place by `strategy`.
pub fn order<T: Candidate>(
    strategy: Strategy,
    targets: &[T],
    candidates: &mut [usize],
    needs: &Needs,
    rng: &mut impl Rng,
) {
    match strategy {
        Strategy::Fallback => {}
        Strategy::Weighted => {
            // Weighted draws without replacement: the first is the split, the rest the fallback.
            for i in 0..candidates.len() {
                let total: u64 = candidates[i..]
                    .iter()
                    .map(|c| u64::from(targets[*c].weight()))
                    .sum();
                if total == 0 {
                    break;
                }
                let mut draw = rng.random_range(0..total);
                for j in i..candidates.len() {
                    let weight = u64::from(targets[candidates[j]].weight());
                    if draw < weight {
                        candidates[i..=j].rotate_right(1);
                        break;
                    }
                    draw -= weight;
                }
            }
        }
        Strategy::Latency => {
            let now_ms = clock_ms();
            candidates.sort_by_key(|c| targets[*c].stats().latency_key(now_ms));
            // A target due for a refresh is tried first by this request only.
            if let Some(first) = candidates.first() {
                targets[*first].stats().refreshed_ms.store(now_ms, Relaxed);
            }
        }
        Strategy::LeastBusy => {
            candidates.sort_by_key(|c| targets[*c].stats().in_flight.load(Relaxed));
        }
        Strategy::Cost => candidates.sort_by_key(|c| {
            targets[*c]
                .capabilities()
                .cost(needs)
                .map_or((1, 0), |cost| (0, cost))
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::{SeedableRng, rngs::StdRng};
    use switchboard_proto::chat::v1::{ContentPart, ImageUrl, Message, Role, Tool};

    struct T {
        weight: u32,
        caps: Capabilities,
        stats: TargetStats,
    }

    impl Candidate for T {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn capabilities(&self) -> &Capabilities {
            &self.caps
        }
        fn stats(&self) -> &TargetStats {
            &self.stats
        }
    }

    const OPEN: Capabilities = Capabilities {
        context_window: None,
        tools: true,
        images: true,
        price: None,
    };

    fn target(weight: u32, caps: Capabilities) -> T {
        T {
            weight,
            caps,
            stats: TargetStats::default(),
        }
    }

    fn chat(text: &str) -> ChatRequest {
        ChatRequest {
            model: "r".into(),
            messages: vec![Message::text(Role::User, text)],
            ..Default::default()
        }
    }

    #[test]
    fn weights_converge_to_their_split() {
        let targets = vec![target(5, OPEN), target(3, OPEN), target(2, OPEN)];
        let needs = Needs::of(&chat("hi"));
        let mut rng = StdRng::seed_from_u64(42);
        let mut firsts = [0u32; 3];
        let trials = 20_000;
        for _ in 0..trials {
            let mut candidates = vec![0, 1, 2];
            order(
                Strategy::Weighted,
                &targets,
                &mut candidates,
                &needs,
                &mut rng,
            );
            let mut sorted = candidates.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2], "every target stays as a fallback");
            firsts[candidates[0]] += 1;
        }
        for (count, weight) in firsts.iter().zip([5, 3, 2]) {
            let share = f64::from(*count) / f64::from(trials);
            let expected = f64::from(weight) / 10.0;
            assert!((share - expected).abs() < 0.02, "{firsts:?}");
        }
        // A weight of 0 is only a last resort.
        let targets = vec![target(0, OPEN), target(1, OPEN)];
        for _ in 0..100 {
            let mut candidates = vec![0, 1];
            order(
                Strategy::Weighted,
                &targets,
                &mut candidates,
                &needs,
                &mut rng,
            );
            assert_eq!(candidates, vec![1, 0]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_latency_is_measured_again_by_one_request() {
        let mut rng = StdRng::seed_from_u64(1);
        let needs = Needs::of(&chat("hi"));
        let targets = vec![target(1, OPEN), target(1, OPEN)];
        targets[0].stats.observe(Duration::from_millis(300));
        targets[1].stats.observe(Duration::from_millis(20));
        let first = |rng: &mut StdRng| {
            let mut candidates = vec![0, 1];
            order(Strategy::Latency, &targets, &mut candidates, &needs, rng);
            candidates[0]
        };
        assert_eq!(first(&mut rng), 1);
        tokio::time::advance(Duration::from_secs(20)).await;
        targets[1].stats.observe(Duration::from_millis(20));
        assert_eq!(first(&mut rng), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        // Target 0's measure is 30 s old: one request re-measures it, the next ones do not.
        assert_eq!(first(&mut rng), 0);
        assert_eq!(first(&mut rng), 1);
        assert_eq!(first(&mut rng), 1);
    }

    #[test]
    fn latency_least_busy_and_cost_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let needs = Needs::of(&chat("hello there"));
        let targets = vec![target(1, OPEN), target(1, OPEN), target(1, OPEN)];
        targets[0].stats.observe(Duration::from_millis(300));
        targets[1].stats.observe(Duration::from_millis(20));
        // Unmeasured targets go first, so they get measured.
        let mut candidates = vec![0, 1, 2];
        order(
            Strategy::Latency,
            &targets,
            &mut candidates,
            &needs,
            &mut rng,
        );
        assert_eq!(candidates, vec![2, 1, 0]);
        targets[2].stats.observe(Duration::from_millis(100));
        // The EWMA follows a target that slows down.
        for _ in 0..5 {
            targets[1].stats.observe(Duration::from_millis(500));
        }
        let mut candidates = vec![0, 1, 2];
        order(
            Strategy::Latency,
            &targets,
            &mut candidates,
            &needs,
            &mut rng,
        );
        assert_eq!(candidates, vec![2, 0, 1]);

        targets[0].stats.in_flight.store(4, Relaxed);
        targets[1].stats.in_flight.store(1, Relaxed);
        targets[2].stats.in_flight.store(2, Relaxed);
        let mut candidates = vec![0, 1, 2];
        order(
            Strategy::LeastBusy,
            &targets,
            &mut candidates,
            &needs,
            &mut rng,
        );
        assert_eq!(candidates, vec![1, 2, 0]);

        let priced = |input, output| Capabilities {
            price: Some((input, output)),
            ..OPEN
        };
        let targets = vec![
            target(1, OPEN),
            target(1, priced(2_500_000_000, 10_000_000_000)),
            target(1, priced(150_000_000, 600_000_000)),
        ];
        let mut candidates = vec![0, 1, 2];
        order(Strategy::Cost, &targets, &mut candidates, &needs, &mut rng);
        assert_eq!(candidates, vec![2, 1, 0], "unpriced last");
    }

    #[test]
    fn capability_filter_states_its_reason() {
        let small = Capabilities {
            context_window: Some(100),
            tools: false,
            images: false,
            price: None,
        };
        let needs = Needs::of(&chat(&"word ".repeat(200)));
        assert!(needs.prompt_tokens > 100);
        assert_eq!(small.refuses(&needs).unwrap().0, "CONTEXT_WINDOW_TOO_SMALL");
        assert!(OPEN.refuses(&needs).is_none());

        let mut request = chat("hi");
        request.tools = vec![Tool {
            name: "f".into(),
            ..Default::default()
        }];
        assert_eq!(
            small.refuses(&Needs::of(&request)).unwrap().0,
            "NO_TOOL_SUPPORT"
        );
        let mut request = chat("hi");
        request.messages[0].content.push(ContentPart {
            part: Some(Part::ImageUrl(ImageUrl {
                url: "https://example.com/cat.png".into(),
                detail: String::new(),
            })),
        });
        let large = Capabilities {
            context_window: Some(100_000),
            ..small
        };
        assert_eq!(
            large.refuses(&Needs::of(&request)).unwrap().0,
            "NO_IMAGE_INPUT"
        );
    }

    #[test]
    fn rules_match_app_team_task_and_tags() {
        let index_of = HashMap::from([("p/small".to_owned(), 0), ("p/big".to_owned(), 1)]);
        let rule = Rule::new(
            &RuleConfig {
                team: Some("research".into()),
                task: Some("classification".into()),
                tags: [("tier".to_owned(), "free".to_owned())].into(),
                targets: vec!["p/small".into()],
                ..Default::default()
            },
            &index_of,
        );
        assert_eq!(rule.targets, vec![0]);
        let caller = Caller {
            team: "research".into(),
            ..Default::default()
        };
        let mut request = chat("hi");
        assert!(!rule.matches(&caller, &request));
        request.tags.insert("task".into(), "classification".into());
        request.tags.insert("tier".into(), "free".into());
        assert!(rule.matches(&caller, &request));
        assert!(!rule.matches(&Caller::default(), &request));
    }
}
