//! The guard's side of a request beyond CheckPrompt: whether the route fails open or closed when the
//! guard is unreachable (`[gateway.guard]`), and what the prompt check said about the answer
//! ([`GuardVerdict`]: whether CheckAnswer must run, whether the request went unchecked).
//!
//! Answers are checked after the provider and before pseudonyms are restored, only when the
//! guard's CheckPrompt response says the app's or route's policy acts on answers
//! (`check_answer`), so the common path adds no RPC. The cache stores the answer *after* the
//! answer check (still with placeholders): it must never hold a value the policy said to redact.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Deserialize;
use switchboard_config::ConfigError;

/// `[gateway.guard]`.
///
/// ```toml
/// [gateway.guard]
/// fail_open_routes = ["internal-summaries"]  # requested models/routes served without the guard
///                                            # when it is unreachable; every other route: 503
/// overlap_passthrough = true                 # route a prompt while the guard checks it when its
///                                            # policy can neither block nor change it (ADR 011)
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Routes (requested model names) that proceed unchecked when the guard is unreachable;
    /// every other route fails closed with a 503 `guard_unavailable`.
    pub fail_open_routes: Vec<String>,
    /// Whether a prompt whose guard policy can neither block nor change it (the guard says so)
    /// goes to the router while the guard checks it, the answer held until the check is in
    /// (ADR 011). Default on; off: every prompt is checked before it is routed.
    pub overlap_passthrough: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            fail_open_routes: Vec::new(),
            overlap_passthrough: true,
        }
    }
}

impl GuardConfig {
    /// Checks the values; errors name the dotted field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeSet::new();
        for (i, route) in self.fail_open_routes.iter().enumerate() {
            if route.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("gateway.guard.fail_open_routes[{i}]"),
                    "must not be empty",
                ));
            }
            if !seen.insert(route) {
                return Err(ConfigError::invalid(
                    format!("gateway.guard.fail_open_routes[{i}]"),
                    format!("`{route}` is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// How the gateway treats an unreachable guard, per route.
#[derive(Clone, Default)]
pub struct GuardFailure {
    fail_open: Arc<BTreeSet<String>>,
    /// Requests let through unchecked (prompt or answer) because their route fails open.
    fail_open_total: Arc<AtomicU64>,
    /// Where an unchecked request's audit event goes (none: only the metric and the usage tag).
    audit: Option<UncheckedAudit>,
}

/// Publishes the gateway's own audit event of a request the guard did not check.
#[derive(Clone)]
struct UncheckedAudit {
    js: async_nats::jetstream::Context,
    nats: switchboard_bus::NatsConfig,
    tasks: tokio_util::task::TaskTracker,
}

/// The request a fail-open decision is about.
pub struct Unchecked<'a> {
    /// Request id.
    pub request_id: &'a str,
    /// App id.
    pub app: &'a str,
    /// Team id.
    pub team: &'a str,
    /// Route (requested model).
    pub route: &'a str,
    /// `prompt` or `answer`.
    pub direction: &'static str,
    /// Why the guard did not check it.
    pub cause: crate::error::GuardDown,
}

impl GuardFailure {
    /// From `[gateway.guard]`.
    pub fn new(config: &GuardConfig) -> Self {
        GuardFailure {
            fail_open: Arc::new(config.fail_open_routes.iter().cloned().collect()),
            fail_open_total: Arc::default(),
            audit: None,
        }
    }

    /// Also publishes an audit event (decision `unchecked`, source `gateway`) to the audit stream
    /// for every request let through unchecked, in a task tracked by `tasks`.
    pub fn with_audit(
        mut self,
        js: async_nats::jetstream::Context,
        nats: switchboard_bus::NatsConfig,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        self.audit = Some(UncheckedAudit { js, nats, tasks });
        self
    }

    /// Whether the request's route proceeds without the guard (counted, logged and audited when
    /// it does).
    pub fn fails_open(&self, request: &Unchecked<'_>) -> bool {
        if !self.fail_open.contains(request.route) {
            return false;
        }
        let total = self.fail_open_total.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            request.id = %request.request_id,
            route = %request.route,
            direction = request.direction,
            cause = request.cause.as_str(),
            guard_fail_open_total = total,
            "guard did not check; route fails open: request proceeds unchecked"
        );
        if let Some(audit) = &self.audit {
            let event = unchecked_event(request);
            let parent = switchboard_telemetry::current_context();
            let (js, nats) = (audit.js.clone(), audit.nats.clone());
            audit.tasks.spawn(async move {
                let published = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    switchboard_bus::publish_audit_in(&js, &nats, &event, &parent)
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())
                })
                .await;
                if !matches!(published, Ok(Ok(_))) {
                    tracing::error!(audit.event_id = %event.event_id, "audit event of an unchecked request not published");
                }
            });
        }
        true
    }

    /// `switchboard_guard_fail_open_total`.
    pub fn fail_open_total(&self) -> u64 {
        self.fail_open_total.load(Ordering::Relaxed)
    }
}

/// The audit event of a request let through without the guard.
fn unchecked_event(request: &Unchecked<'_>) -> switchboard_bus::AuditEvent {
    let occurred_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    switchboard_bus::AuditEvent {
        event_id: format!("{}:{}:0", request.request_id, request.direction),
        request_id: request.request_id.to_owned(),
        app: request.app.to_owned(),
        team: request.team.to_owned(),
        route: request.route.to_owned(),
        direction: request.direction.to_owned(),
        decision: "unchecked".to_owned(),
        injection_decision: "none".to_owned(),
        trace_id: switchboard_telemetry::current_trace_id(),
        occurred_at_unix_ms,
        source: "gateway".to_owned(),
        ..Default::default()
    }
}

/// What the prompt check decided about the rest of the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardVerdict {
    /// The policy acts on answers: CheckAnswer runs on the provider's answer.
    pub check_answer: bool,
    /// The guard was unreachable and the route fails open: the prompt, or the answer (CheckAnswer
    /// failed after CheckPrompt passed; for a stream, any one window), went through unchecked.
    /// The usage event is tagged `switchboard.guard = unchecked` and the answer is not cached.
    pub unchecked: bool,
}

/// The usage-event tag of a request the guard did not check.
pub const UNCHECKED_TAG: (&str, &str) = ("switchboard.guard", "unchecked");

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_routes_fail_open_and_they_are_counted() {
        let failure = GuardFailure::new(&GuardConfig {
            fail_open_routes: vec!["open".into()],
            ..GuardConfig::default()
        });
        let request = |route| Unchecked {
            request_id: "r1",
            app: "a",
            team: "t",
            route,
            direction: "prompt",
            cause: crate::error::GuardDown::Overloaded,
        };
        assert!(!failure.fails_open(&request("gpt-4o")));
        assert!(failure.fails_open(&request("open")));
        assert_eq!(failure.fail_open_total(), 1);
        assert!(!GuardFailure::default().fails_open(&request("open")));
        let event = unchecked_event(&request("open"));
        assert_eq!(
            (event.event_id.as_str(), event.decision.as_str()),
            ("r1:prompt:0", "unchecked")
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let error = GuardConfig {
            fail_open_routes: vec!["a".into(), "a".into()],
            ..GuardConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("gateway.guard.fail_open_routes[1]"),
            "{error}"
        );
        assert!(
            GuardConfig {
                fail_open_routes: vec![" ".into()],
                ..GuardConfig::default()
            }
            .validate()
            .is_err()
        );
    }
}

/// Characters of a streamed answer held back before they are checked: more than the longest entity
/// that could straddle a chunk boundary (cards, IBANs, emails, keys), so that a value split by the
/// provider's chunking is whole when its window is checked.
pub const STREAM_HOLD_CHARS: usize = 128;

/// The most characters held back while no safe cut point exists (a long run of capitalised words,
/// numbers or text without whitespace): beyond this a window is cut anyway, so a stream never
/// stalls. The cut then falls at the last whitespace not between two digits that leaves at most
/// this many characters held, or, when there is none, exactly [`STREAM_HOLD_CHARS`] before the end.
pub const STREAM_MAX_HOLD_CHARS: usize = 1024;

/// Where the stable part of `pending` (to be checked and sent now) ends, or `None` when nothing
/// is stable yet. At least [`STREAM_HOLD_CHARS`] characters are always held back. Each window is
/// checked on its own, so the cut must not fall inside a multi-word entity (a name, a street
/// address, a phone number or IBAN written in groups). In order of preference, the cut is after:
///
/// 1. the last line break or sentence end (`.`, `!`, `?`, not after an initial or a title such as
///    `Q.`, `Dr.`, `St.`, and not followed by a lower-case letter);
/// 2. the last whitespace that is safe: not between two capitalised words (or name particles such
///    as `van`, `de`), not after a word containing a digit (`221B Baker`, `+44 20`, `DE89 3704`),
///    and not before one starting with a digit;
/// 3. only when more than [`STREAM_MAX_HOLD_CHARS`] are pending and neither 1 nor 2 leaves at
///    most that many held: the last whitespace not between two digits that does, else a hard cut
///    [`STREAM_HOLD_CHARS`] before the end.
pub fn stable_cut(pending: &str) -> Option<usize> {
    let chars: Vec<(usize, char)> = pending.char_indices().collect();
    if chars.len() <= STREAM_HOLD_CHARS {
        return None;
    }
    let limit = chars.len() - STREAM_HOLD_CHARS;
    let byte_after = |i: usize| chars[i].0 + chars[i].1.len_utf8();
    // Whitespace positions in the stable region, last first.
    let spaces = || (1..=limit).rev().filter(|&i| chars[i].1.is_whitespace());
    let within_bound = |i: usize| chars.len() - (i + 1) <= STREAM_MAX_HOLD_CHARS;
    let over_bound = chars.len() > STREAM_MAX_HOLD_CHARS;
    let acceptable = |i: &usize| !over_bound || within_bound(*i);
    if let Some(i) = spaces()
        .find(|&i| is_sentence_break(&chars, i))
        .filter(acceptable)
    {
        return Some(byte_after(i));
    }
    if let Some(i) = spaces()
        .find(|&i| is_safe_break(&chars, i))
        .filter(acceptable)
    {
        return Some(byte_after(i));
    }
    if !over_bound {
        return None;
    }
    // Bounded hold: the old rule, then a hard cut.
    let fallback = spaces().take_while(|&i| within_bound(i)).find(|&i| {
        let before = chars[i - 1].1;
        let after = chars.get(i + 1).map(|(_, c)| *c);
        !(before.is_ascii_digit() && after.is_some_and(|a| a.is_ascii_digit()))
    });
    Some(fallback.map_or(chars[limit].0, byte_after))
}

/// Titles and abbreviations after which a period does not end a sentence (lower case).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "ste", "mt", "ft", "ave", "av", "rd",
    "blvd", "ln", "apt", "no", "nr", "vs", "co", "inc", "ltd", "hr", "fr", "frau", "herr", "sra",
    "sgt", "capt", "gen", "rev", "hon", "tel", "ph", "ext", "e.g", "i.e", "etc", "approx",
];

/// Lower-case particles that belong to a name or a street between capitalised words
/// (`Ludwig van Beethoven`, `Rue de la Paix`).
const NAME_PARTICLES: &[&str] = &[
    "van", "von", "der", "den", "de", "del", "della", "di", "da", "du", "dos", "das", "la", "le",
    "ter", "ten", "bin", "al", "el", "y", "zu", "of",
];

/// The whitespace-separated word ending before `chars[i]` (skipping whitespace), as a string.
fn word_before(chars: &[(usize, char)], i: usize) -> String {
    let mut end = i;
    while end > 0 && chars[end - 1].1.is_whitespace() {
        end -= 1;
    }
    let mut start = end;
    while start > 0 && !chars[start - 1].1.is_whitespace() {
        start -= 1;
    }
    chars[start..end].iter().map(|(_, c)| c).collect()
}

/// The whitespace-separated word starting after `chars[i]` (skipping whitespace).
fn word_after(chars: &[(usize, char)], i: usize) -> String {
    chars[i + 1..]
        .iter()
        .map(|(_, c)| *c)
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| !c.is_whitespace())
        .collect()
}

/// A line break, or whitespace after a sentence's final `.`/`!`/`?` (closing quotes or brackets
/// may follow it).
fn is_sentence_break(chars: &[(usize, char)], i: usize) -> bool {
    if matches!(chars[i].1, '\n' | '\r' | '\u{2028}' | '\u{2029}') {
        return true;
    }
    let before = word_before(chars, i);
    let trimmed = before.trim_end_matches(['"', '\'', ')', ']', '\u{201d}', '\u{2019}']);
    let Some(last) = trimmed.chars().next_back() else {
        return false;
    };
    if !matches!(last, '.' | '!' | '?') {
        return false;
    }
    let next = word_after(chars, i);
    if next.chars().next().is_some_and(char::is_lowercase) {
        return false;
    }
    if last == '.' {
        let stem = trimmed
            .trim_end_matches('.')
            .trim_start_matches(['"', '\'', '(', '[']);
        let single_letter = stem.chars().count() == 1 && stem.chars().all(char::is_alphabetic);
        if single_letter || ABBREVIATIONS.contains(&stem.to_lowercase().as_str()) {
            return false;
        }
    }
    true
}

/// Whitespace that no multi-word entity crosses: see [`stable_cut`], rule 2.
fn is_safe_break(chars: &[(usize, char)], i: usize) -> bool {
    let before = word_before(chars, i);
    let after = word_after(chars, i);
    if before.chars().any(|c| c.is_ascii_digit()) {
        return false;
    }
    let first = |w: &str| {
        w.chars()
            .find(|c| !matches!(c, '(' | '[' | '"' | '\'' | '+'))
    };
    if first(&after).is_some_and(|c| c.is_ascii_digit()) {
        return false;
    }
    let name_like = |w: &str| {
        let bare = w.trim_matches(|c: char| !c.is_alphanumeric());
        first(w).is_some_and(char::is_uppercase) || NAME_PARTICLES.contains(&bare)
    };
    !(name_like(&before) && name_like(&after))
}

/// Held-back answer text of a stream, per choice index, and reasoning text per (choice, block).
#[derive(Debug, Default)]
pub struct StreamHold {
    pending: std::collections::BTreeMap<u32, String>,
    /// A refusal per choice, held whole until its choice ends and then checked as one window
    /// (refusals are short).
    refusal: std::collections::BTreeMap<u32, String>,
    thinking: std::collections::BTreeMap<(u32, u32), String>,
    /// Reasoning blocks whose checked text differs from the provider's (their signature, which
    /// covers the original text, must not be passed on).
    rewritten: std::collections::BTreeSet<(u32, u32)>,
    /// Windows checked so far (the CheckAnswer `sequence` of the next one is this + 1).
    pub windows: u32,
}

/// Appends `content` to `pending` and splits off the stable text (all of it when `last`).
fn release(pending: &mut String, content: &str, last: bool) -> String {
    pending.push_str(content);
    let cut = if last {
        Some(pending.len())
    } else {
        stable_cut(pending)
    };
    match cut {
        Some(cut) => {
            let rest = pending.split_off(cut);
            std::mem::replace(pending, rest)
        }
        None => String::new(),
    }
}

impl StreamHold {
    /// Adds `content` of choice `index` and returns the stable text to check and send now
    /// (empty when everything is still held back). `last`: the choice finished, flush it all.
    pub fn push(&mut self, index: u32, content: &str, last: bool) -> String {
        release(self.pending.entry(index).or_default(), content, last)
    }

    /// [`StreamHold::push`] for the text of reasoning block `block` of choice `index`; `last`:
    /// the block ended (its signature arrived) or the choice finished.
    pub fn push_thinking(&mut self, index: u32, block: u32, text: &str, last: bool) -> String {
        release(self.thinking.entry((index, block)).or_default(), text, last)
    }

    /// Everything still held of choice `index`'s reasoning blocks other than `except`, by block
    /// (a later block, the answer text or the end of the choice follows: they end here).
    pub fn take_thinking(&mut self, index: u32, except: Option<u32>) -> Vec<(u32, String)> {
        let keys: Vec<(u32, u32)> = self
            .thinking
            .range((index, 0)..=(index, u32::MAX))
            .filter(|((_, block), text)| Some(*block) != except && !text.is_empty())
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter()
            .filter_map(|key| Some((key.1, self.thinking.remove(&key)?)))
            .collect()
    }

    /// Notes that the checked text of a reasoning block differs from what the provider sent.
    pub fn mark_rewritten(&mut self, index: u32, block: u32) {
        self.rewritten.insert((index, block));
    }

    /// Whether a reasoning block's text was rewritten by the check.
    pub fn is_rewritten(&self, index: u32, block: u32) -> bool {
        self.rewritten.contains(&(index, block))
    }

    /// Everything still held, by choice index (end of stream).
    pub fn drain(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }

    /// Holds a piece of choice `index`'s refusal.
    pub fn push_refusal(&mut self, index: u32, piece: &str) {
        self.refusal.entry(index).or_default().push_str(piece);
    }

    /// Choice `index`'s whole refusal, when it has one (its choice ended).
    pub fn take_refusal(&mut self, index: u32) -> Option<String> {
        self.refusal.remove(&index).filter(|text| !text.is_empty())
    }

    /// Refusals still held, by choice (end of stream).
    pub fn drain_refusals(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.refusal)
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }

    /// Reasoning text still held, by (choice index, block) (end of stream).
    pub fn drain_thinking(&mut self) -> Vec<((u32, u32), String)> {
        std::mem::take(&mut self.thinking)
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod stream_tests {
    use super::*;

    #[test]
    fn text_is_held_until_enough_follows_and_cuts_avoid_digit_groups() {
        let mut hold = StreamHold::default();
        assert_eq!(hold.push(0, "write to jane.", false), "");
        assert_eq!(hold.push(0, "doe@example.org please", false), "");
        let long = "x ".repeat(STREAM_HOLD_CHARS);
        let stable = hold.push(0, &long, false);
        // The email is in the stable part whole, and at least the hold is kept back.
        assert!(stable.starts_with("write to jane.doe@example.org please"));
        let held: usize = hold.drain().iter().map(|(_, t)| t.chars().count()).sum();
        assert!(held >= STREAM_HOLD_CHARS);

        let card = format!(
            "{}4111 1111 1111 1111{}",
            "a ".repeat(10),
            " b".repeat(STREAM_HOLD_CHARS / 2 - 5)
        );
        let cut = stable_cut(&card).unwrap();
        assert!(!card[..cut].contains("4111 1111") || card[..cut].contains("4111 1111 1111 1111"));
        assert_eq!(hold.push(1, "tail", true), "tail");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod window_tests {
    use super::*;

    /// The cut of the rule before this fix: the last whitespace leaving the hold, not between two
    /// digits (to show that each case below really straddles the old cut).
    fn old_cut(pending: &str) -> Option<usize> {
        let chars: Vec<(usize, char)> = pending.char_indices().collect();
        if chars.len() <= STREAM_HOLD_CHARS {
            return None;
        }
        let limit = chars.len() - STREAM_HOLD_CHARS;
        (1..=limit).rev().find_map(|i| {
            let (at, c) = chars[i];
            let before = chars[i - 1].1;
            let after = chars.get(i + 1).map(|(_, c)| *c);
            (c.is_whitespace()
                && !(before.is_ascii_digit() && after.is_some_and(|a| a.is_ascii_digit())))
            .then_some(at + c.len_utf8())
        })
    }

    /// Lower-case filler words of exactly `len` characters (starting with a space).
    fn filler(len: usize) -> String {
        let mut out = String::new();
        while out.len() < len {
            out.push_str(" lorem");
        }
        out.truncate(len);
        out
    }

    /// Streams `text` through a hold in one push of `first` characters, then chunks of 16, and
    /// returns the windows.
    fn windows(text: &str, first: usize) -> Vec<String> {
        let mut hold = StreamHold::default();
        let mut out = vec![hold.push(0, &text[..first], false)];
        let rest = &text[first..];
        let mut at = 0;
        while at < rest.len() {
            let end = (at + 16).min(rest.len());
            out.push(hold.push(0, &rest[at..end], end == rest.len()));
            at = end;
        }
        out.retain(|w| !w.is_empty());
        out
    }

    #[test]
    fn entities_across_the_old_cut_point_end_up_whole_in_one_window() {
        // (entity, byte offset of the whitespace inside it where the old rule cut)
        for (entity, split) in [
            ("Jane Doe", "Jane ".len()),
            ("Dr. Jane Q. Doe", "Dr. Jane Q. ".len()),
            ("221B Baker Street", "221B ".len()),
            ("221B Baker Street", "221B Baker ".len()),
            ("+44 (0)20 7946 0958", "+44 ".len()),
            ("+44 20 7946 0958", "+44 20 ".len()),
            ("GB82 WEST 1234 5698 7654 32", "GB82 ".len()),
            ("GB82 WEST 1234 5698 7654 32", "GB82 WEST ".len()),
            ("DE89 3704 0044 0532 0130 00", "DE89 3704 ".len()),
            ("Ludwig van Beethoven", "Ludwig van ".len()),
        ] {
            let prefix = format!("the answer is{} for", filler(200));
            let pending_len = prefix.len() + 1 + split + STREAM_HOLD_CHARS;
            let text = format!("{prefix} {entity}{}", filler(600));
            let first = &text[..pending_len];
            // The old rule cut right inside the entity (only where it was not between digits).
            let old = old_cut(first).unwrap();
            let inside = prefix.len() + 1 + split;
            if !(entity.as_bytes()[split - 2].is_ascii_digit()
                && entity.as_bytes()[split].is_ascii_digit())
            {
                assert_eq!(old, inside, "{entity}: the setup must straddle the old cut");
            }
            let cut = stable_cut(first).unwrap();
            assert!(
                cut <= prefix.len() + 1 || cut >= inside + entity.len() - split,
                "{entity}: cut at {cut} inside {}..{}",
                prefix.len() + 1,
                prefix.len() + 1 + entity.len()
            );
            let windows = windows(&text, pending_len);
            assert!(windows.len() > 2, "{entity}: still streamed in windows");
            assert_eq!(windows.concat(), text, "{entity}: nothing lost or repeated");
            assert_eq!(
                windows.iter().filter(|w| w.contains(entity)).count(),
                1,
                "{entity}: whole in one window: {windows:?}"
            );
        }
    }

    #[test]
    fn entities_at_every_offset_and_chunk_size_are_whole_in_one_window() {
        let words = "some plain words of an answer that go on and on";
        for entity in [
            "Jane Doe",
            "221B Baker Street",
            "+44 (0)20 7946 0958",
            "GB82 WEST 1234 5698 7654 32",
        ] {
            for offset in 0..STREAM_HOLD_CHARS + 40 {
                let before: String = words.chars().cycle().take(offset).collect();
                let text = format!("{before} {entity} {}", filler(300));
                for chunk in [1, 7, 33, 200] {
                    let mut hold = StreamHold::default();
                    let mut windows = Vec::new();
                    let mut at = 0;
                    while at < text.len() {
                        let end = (at + chunk).min(text.len());
                        windows.push(hold.push(0, &text[at..end], end == text.len()));
                        at = end;
                    }
                    assert_eq!(windows.concat(), text);
                    assert!(
                        windows.iter().any(|w| w.contains(entity)),
                        "{entity} at {offset}, chunks of {chunk}: {windows:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sentence_ends_and_line_breaks_are_preferred_over_other_whitespace() {
        let text = format!(
            "We met Jane. Then lunch with friends{}{}",
            filler(40),
            filler(STREAM_HOLD_CHARS)
        );
        assert_eq!(stable_cut(&text), Some("We met Jane. ".len()));
        let text = format!(
            "A list:\nitem one and two{}{}",
            filler(40),
            filler(STREAM_HOLD_CHARS)
        );
        assert_eq!(stable_cut(&text), Some("A list:\n".len()));
        // Not after an initial or a title, nor before a lower-case word.
        for text in ["Ask Dr. Jane Q. Doe", "see approx. ten"] {
            let pending = format!("{text}{}", filler(STREAM_HOLD_CHARS));
            let cut = stable_cut(&pending).unwrap_or(0);
            assert!(
                !matches!(
                    &pending[..cut],
                    "Ask Dr. " | "Ask Dr. Jane Q. " | "see approx. "
                ),
                "{text}: {cut}"
            );
        }
        // Safe whitespace between lower-case words is still used when there is no sentence end.
        let text = format!("plain words here{}", filler(STREAM_HOLD_CHARS));
        assert_eq!(stable_cut(&text), Some("plain words here ".len()));
        let text = format!("plain words Here{}", filler(STREAM_HOLD_CHARS));
        assert_eq!(stable_cut(&text), Some("plain words Here ".len()));
        let text = format!("plain Words Here{}", filler(STREAM_HOLD_CHARS - 1));
        assert_eq!(stable_cut(&text), Some("plain ".len()));
    }

    #[test]
    fn a_long_text_without_a_safe_point_still_flushes_within_the_bound() {
        let capitalised = "Alpha Beta Gamma Delta ".repeat(200);
        let digits = "12 34 56 78 90 ".repeat(300);
        let blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo".repeat(150);
        for text in [capitalised, digits, blob] {
            let mut hold = StreamHold::default();
            let mut released = String::new();
            let mut at = 0;
            while at < text.len() {
                let end = (at + 7).min(text.len());
                released.push_str(&hold.push(0, &text[at..end], false));
                let held = text[..end].len() - released.len();
                assert!(
                    held <= STREAM_MAX_HOLD_CHARS + 7,
                    "held {held} characters: the stream stalls"
                );
                at = end;
            }
            assert!(
                released.len() >= text.len() - STREAM_MAX_HOLD_CHARS - 7,
                "released {} of {}",
                released.len(),
                text.len()
            );
            let rest: String = hold.drain().into_iter().map(|(_, t)| t).collect();
            assert_eq!(released + &rest, text);
        }
    }

    #[test]
    fn under_the_bound_text_without_a_safe_point_is_held() {
        let text = format!("Alpha Beta{}", " Gamma".repeat(STREAM_HOLD_CHARS / 4));
        assert!(text.len() < STREAM_MAX_HOLD_CHARS);
        assert_eq!(stable_cut(&text), None);
        assert!(old_cut(&text).is_some());
    }
}
