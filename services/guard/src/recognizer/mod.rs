//! Recognisers: each finds one entity type in a text and scores every candidate. New entity types
//! are added by implementing [`Recognizer`] and registering it in [`Registry::builtin`] (and its
//! name in [`KNOWN_ENTITIES`]).
//!
//! A recogniser validates what it finds (Luhn and issuer ranges, mod-97, SSN area rules, phone
//! metadata, address parsing, token structure) and gives each candidate a base confidence;
//! [`Context`] words near a candidate raise or lower it; the policy's threshold decides.
//! Recognisers run on the normalised view of a text (see [`crate::normalize`]).

mod ner;
mod pii;
mod secrets;

use std::{cell::OnceCell, ops::Range};

pub use ner::{AddressRecognizer, LocationRecognizer, PersonRecognizer};
pub use pii::{
    CreditCardRecognizer, EmailRecognizer, IbanRecognizer, IpRecognizer, PhoneRecognizer,
    SsnRecognizer, UrlCredentialsRecognizer, iban_valid, luhn_valid, ssn_valid,
};
pub use secrets::PatternRecognizer;

/// Email addresses.
pub const EMAIL_ADDRESS: &str = "EMAIL_ADDRESS";
/// Payment card numbers (Luhn-checked, known issuer range and length).
pub const CREDIT_CARD: &str = "CREDIT_CARD";
/// Phone numbers, valid for their region.
pub const PHONE_NUMBER: &str = "PHONE_NUMBER";
/// US social security numbers.
pub const US_SSN: &str = "US_SSN";
/// International bank account numbers (mod-97 and the country's length).
pub const IBAN_CODE: &str = "IBAN_CODE";
/// IPv4 and IPv6 addresses.
pub const IP_ADDRESS: &str = "IP_ADDRESS";
/// `user:password` in a URL.
pub const URL_CREDENTIALS: &str = "URL_CREDENTIALS";
/// AWS access key ids (`AKIA…`, `ASIA…`).
pub const AWS_ACCESS_KEY: &str = "AWS_ACCESS_KEY";
/// AWS secret access keys (40 characters near "aws").
pub const AWS_SECRET_KEY: &str = "AWS_SECRET_KEY";
/// GitHub tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`).
pub const GITHUB_TOKEN: &str = "GITHUB_TOKEN";
/// Slack tokens (`xoxb-`, `xoxp-`, …).
pub const SLACK_TOKEN: &str = "SLACK_TOKEN";
/// OpenAI API keys (`sk-`, `sk-proj-`).
pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
/// Anthropic API keys (`sk-ant-`).
pub const ANTHROPIC_API_KEY: &str = "ANTHROPIC_API_KEY";
/// PEM private key blocks.
pub const PRIVATE_KEY: &str = "PRIVATE_KEY";
/// JSON web tokens.
pub const JWT: &str = "JWT";
/// People's names (dictionaries and rules; see [`PersonRecognizer`]).
pub const PERSON: &str = "PERSON";
/// Street addresses (house number, street, suffix, unit, city, ZIP).
pub const STREET_ADDRESS: &str = "STREET_ADDRESS";
/// Countries, states, regions and large cities (a gazetteer).
pub const LOCATION: &str = "LOCATION";

/// Every entity type the guard can recognise (configuration is validated against this list).
pub const KNOWN_ENTITIES: &[&str] = &[
    EMAIL_ADDRESS,
    CREDIT_CARD,
    PHONE_NUMBER,
    US_SSN,
    IBAN_CODE,
    IP_ADDRESS,
    URL_CREDENTIALS,
    AWS_ACCESS_KEY,
    AWS_SECRET_KEY,
    GITHUB_TOKEN,
    SLACK_TOKEN,
    OPENAI_API_KEY,
    ANTHROPIC_API_KEY,
    PRIVATE_KEY,
    JWT,
    LOCATION,
    PERSON,
    STREET_ADDRESS,
];

/// Entity types whose values are digits (and letters) with free formatting: their canonical form
/// keeps the ASCII letters and digits only, upper-cased.
pub(crate) const NUMBER_LIKE: &[&str] = &[CREDIT_CARD, PHONE_NUMBER, US_SSN, IBAN_CODE];

/// Words near a candidate that raise or lower its confidence (matched case-insensitively as whole
/// words within [`CONTEXT_BEFORE`] bytes before and [`CONTEXT_AFTER`] bytes after it).
#[derive(Debug)]
pub struct Context {
    /// Words that make the entity more likely (e.g. "ssn" near a 9-digit number).
    pub raise: &'static [&'static str],
    /// Words that make it less likely (e.g. "order" near a 16-digit number).
    pub lower: &'static [&'static str],
    /// Added when a `raise` word is near.
    pub boost: f32,
    /// Subtracted when a `lower` word is near.
    pub penalty: f32,
}

impl Context {
    /// No context words.
    pub const NONE: Context = Context {
        raise: &[],
        lower: &[],
        boost: 0.0,
        penalty: 0.0,
    };
}

/// Bytes before a candidate searched for context words.
pub const CONTEXT_BEFORE: usize = 48;
/// Bytes after a candidate searched for context words.
pub const CONTEXT_AFTER: usize = 24;

/// A candidate found by a recogniser, before context and threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Byte range in the scanned text.
    pub range: Range<usize>,
    /// Base confidence, 0.0..=1.0.
    pub score: f32,
}

/// The text being scanned and what recognisers share about it (computed once, on first use).
pub struct Input<'a> {
    text: &'a str,
    digits: OnceCell<DigitRuns>,
}

/// Runs of ASCII digit groups separated by at most [`MAX_DIGIT_GAP`] separator bytes
/// (space, tab, `-`, `.`, `/`, `_`): `4111 1111-1111.1111`, `4 1 1 1 …`, `123 - 45 - 6789`.
#[derive(Debug, Default)]
pub struct DigitRuns {
    /// Maximal sequences of ASCII digits, in order.
    pub groups: Vec<Range<usize>>,
    /// Index ranges into `groups`, one per run.
    pub runs: Vec<Range<usize>>,
}

/// The most separator bytes between two digit groups of one run.
pub const MAX_DIGIT_GAP: usize = 3;

impl<'a> Input<'a> {
    /// Wraps `text`.
    pub fn new(text: &'a str) -> Self {
        Input {
            text,
            digits: OnceCell::new(),
        }
    }

    /// The text.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The digit runs of the text (spaced-out and separated digits joined).
    pub fn digit_runs(&self) -> &DigitRuns {
        self.digits.get_or_init(|| digit_runs(self.text))
    }
}

fn digit_runs(text: &str) -> DigitRuns {
    let bytes = text.as_bytes();
    let mut out = DigitRuns::default();
    let mut i = 0;
    let mut run_start = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let joined = out.groups.last().is_some_and(|last| {
            let gap = &bytes[last.end..start];
            !gap.is_empty()
                && gap.len() <= MAX_DIGIT_GAP
                && gap
                    .iter()
                    .all(|b| matches!(b, b' ' | b'\t' | b'-' | b'.' | b'/' | b'_'))
        });
        if !joined && !out.groups.is_empty() {
            out.runs.push(run_start..out.groups.len());
            run_start = out.groups.len();
        }
        out.groups.push(start..i);
    }
    if !out.groups.is_empty() {
        out.runs.push(run_start..out.groups.len());
    }
    out
}

/// The digits (0..=9) of `groups` in `text`, into `out` (cleared first).
pub(crate) fn collect_digits(text: &str, groups: &[Range<usize>], out: &mut Vec<u8>) {
    out.clear();
    for g in groups {
        out.extend(text.as_bytes()[g.clone()].iter().map(|b| b - b'0'));
    }
}

/// Finds the occurrences of one entity type in a text.
pub trait Recognizer: Send + Sync {
    /// The entity type, as used in configuration and findings (e.g. `EMAIL_ADDRESS`).
    fn entity_type(&self) -> &'static str;
    /// Appends the validated candidates in `input` with their base confidence.
    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>);
    /// Context words that raise or lower the confidence of a candidate.
    fn context(&self) -> &Context {
        &Context::NONE
    }
}

/// Why the built-in recognisers cannot be compiled (a bug).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A pattern does not compile.
    #[error("cannot compile a recogniser pattern: {0}")]
    Regex(#[from] regex::Error),
    /// A word list does not compile.
    #[error("cannot compile a recogniser word list: {0}")]
    Automaton(#[from] aho_corasick::BuildError),
}

/// The recognisers available to policies, by entity type.
pub struct Registry {
    recognizers: Vec<Box<dyn Recognizer>>,
}

impl Registry {
    /// The built-in recognisers (one per entry of [`KNOWN_ENTITIES`]); national phone numbers
    /// are validated for `phone_regions`, in order.
    pub fn builtin(phone_regions: &[phonenumber::country::Id]) -> Result<Self, BuildError> {
        let mut recognizers: Vec<Box<dyn Recognizer>> = vec![
            Box::new(EmailRecognizer::new()?),
            Box::new(CreditCardRecognizer),
            Box::new(PhoneRecognizer::new(phone_regions)?),
            Box::new(SsnRecognizer),
            Box::new(IbanRecognizer::new()?),
            Box::new(IpRecognizer::new()?),
            Box::new(UrlCredentialsRecognizer::new()?),
            Box::new(LocationRecognizer::new()?),
            Box::new(PersonRecognizer::new()),
            Box::new(AddressRecognizer::new()?),
        ];
        for secret in secrets::builtin()? {
            recognizers.push(Box::new(secret));
        }
        Ok(Registry { recognizers })
    }

    /// The recogniser of `entity_type`.
    pub fn get(&self, entity_type: &str) -> Option<&dyn Recognizer> {
        self.recognizers
            .iter()
            .find(|r| r.entity_type() == entity_type)
            .map(|r| r.as_ref())
    }
}

/// One match of one recogniser.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Entity type of the recogniser that matched.
    pub entity_type: &'static str,
    /// Byte range in the text.
    pub range: Range<usize>,
    /// Confidence after context, 0.0..=1.0.
    pub score: f32,
}

/// Runs `recognizers` over `text` (a normalised view), keeps the candidates whose confidence after
/// context is at least the recogniser's threshold (paired with it) and that `allowed(entity_type, value)` does not exempt, and
/// resolves overlaps so every byte belongs to at most one entity: a match inside another is
/// dropped; of two that cross, the one that starts first is kept unless the other has a higher
/// confidence.
pub fn scan(
    text: &str,
    recognizers: &[(&dyn Recognizer, f32)],
    allowed: impl Fn(&'static str, &str) -> bool,
) -> Vec<Match> {
    let input = Input::new(text);
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut all: Vec<Match> = Vec::new();
    for &(r, min_score) in recognizers {
        candidates.clear();
        r.find(&input, &mut candidates);
        let context = r.context();
        for c in candidates.drain(..) {
            let score = adjust(text, &c.range, context, c.score);
            if score < min_score || allowed(r.entity_type(), &text[c.range.clone()]) {
                continue;
            }
            all.push(Match {
                entity_type: r.entity_type(),
                range: c.range,
                score,
            });
        }
    }
    all.sort_by(|a, b| {
        a.range
            .start
            .cmp(&b.range.start)
            .then(b.range.end.cmp(&a.range.end))
    });
    let mut kept: Vec<Match> = Vec::with_capacity(all.len());
    for m in all {
        match kept.last_mut() {
            Some(last) if m.range.start < last.range.end => {
                // A match inside another is part of it (`4111…@example.com` is an email); of two
                // that cross, the more confident one wins.
                if m.range.end > last.range.end && m.score > last.score {
                    *last = m;
                }
            }
            _ => kept.push(m),
        }
    }
    kept
}

/// Applies the context words around `range` to `score`.
pub fn adjust(text: &str, range: &Range<usize>, context: &Context, score: f32) -> f32 {
    if context.raise.is_empty() && context.lower.is_empty() {
        return score;
    }
    let mut score = score;
    if word_near(text, range, context.raise) {
        score += context.boost;
    }
    if word_near(text, range, context.lower) {
        score -= context.penalty;
    }
    score.clamp(0.0, 1.0)
}

/// Whether one of `words` is within [`CONTEXT_BEFORE`] bytes before or [`CONTEXT_AFTER`] bytes
/// after `range` (the window [`adjust`] uses).
pub(crate) fn word_near(text: &str, range: &Range<usize>, words: &[&str]) -> bool {
    if words.is_empty() {
        return false;
    }
    let mut from = range.start.saturating_sub(CONTEXT_BEFORE);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = range.end.saturating_add(CONTEXT_AFTER).min(text.len());
    while !text.is_char_boundary(to) {
        to += 1;
    }
    has_word(&text[from..range.start], words) || has_word(&text[range.end..to], words)
}

/// Whether `hay` contains one of `words` (ASCII case-insensitive, as a whole word).
fn has_word(hay: &str, words: &[&str]) -> bool {
    let hay = hay.as_bytes();
    words.iter().any(|word| {
        let word = word.as_bytes();
        if word.is_empty() || word.len() > hay.len() {
            return false;
        }
        (0..=hay.len() - word.len()).any(|at| {
            hay[at..at + word.len()].eq_ignore_ascii_case(word)
                && (at == 0 || !hay[at - 1].is_ascii_alphanumeric() || escape_before(hay, at))
                && hay
                    .get(at + word.len())
                    .is_none_or(|b| !b.is_ascii_alphanumeric())
        })
    })
}

/// Whether `hay[..at]` ends with a literal `\n`, `\t` or `\r` escape (text pasted from JSON or
/// code): a separator, although its last byte is a letter.
pub(crate) fn escape_before(hay: &[u8], at: usize) -> bool {
    at >= 2 && matches!(hay[at - 1], b'n' | b't' | b'r') && hay[at - 2] == b'\\'
}

/// The canonical form of a matched value, used for allow-lists, keyed hashes and pseudonyms:
/// letters and digits only, upper-cased, for number-like entities (`4111 1111…` = `41111111…`);
/// lower-cased email addresses; other values as they are.
pub fn canonical(entity_type: &str, value: &str) -> String {
    if NUMBER_LIKE.contains(&entity_type) {
        value
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect()
    } else if entity_type == EMAIL_ADDRESS {
        value.to_lowercase()
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// The matched values of `r` in `text` with their base confidence.
    pub(crate) fn found<'a>(r: &dyn Recognizer, text: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        r.find(&Input::new(text), &mut out);
        out.into_iter().map(|c| &text[c.range]).collect()
    }

    pub(crate) fn registry() -> Registry {
        Registry::builtin(&[phonenumber::country::Id::US, phonenumber::country::Id::GB]).unwrap()
    }

    pub(crate) fn all(registry: &Registry) -> Vec<(&dyn Recognizer, f32)> {
        KNOWN_ENTITIES
            .iter()
            .map(|e| (registry.get(e).unwrap(), 0.5))
            .collect()
    }

    /// Scans `text` with every recogniser at threshold 0.5: (entity type, value) pairs.
    pub(crate) fn scanned(text: &str) -> Vec<(&'static str, &str)> {
        static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        let registry = REGISTRY.get_or_init(registry);
        scan(text, &all(registry), |_, _| false)
            .into_iter()
            .map(|m| (m.entity_type, &text[m.range]))
            .collect()
    }

    #[test]
    fn registry_covers_every_known_entity() {
        let registry = registry();
        for entity in KNOWN_ENTITIES {
            assert_eq!(registry.get(entity).map(|r| r.entity_type()), Some(*entity));
        }
        assert!(registry.get("NAME").is_none());
    }

    #[test]
    fn digit_runs_join_separated_digits() {
        let text = "a 4111 1111-1111.1111, 12 - 34 x 5  6 7\t8";
        let runs = digit_runs(text);
        let rendered: Vec<String> = runs
            .runs
            .iter()
            .map(|r| {
                runs.groups[r.clone()]
                    .iter()
                    .map(|g| &text[g.clone()])
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        assert_eq!(rendered, ["4111|1111|1111|1111", "12|34", "5|6|7|8"]);
    }

    #[test]
    fn context_words_raise_and_lower_confidence() {
        let context = Context {
            raise: &["ssn", "social security"],
            lower: &["order"],
            boost: 0.4,
            penalty: 0.4,
        };
        let score = |text: &str| {
            let at = text.find("123").unwrap();
            adjust(text, &(at..at + 9), &context, 0.3)
        };
        assert!((score("my SSN: 123456789") - 0.7).abs() < 1e-6);
        assert!((score("social security number 123456789.") - 0.7).abs() < 1e-6);
        assert!((score("order 123456789") - 0.0).abs() < 1e-6);
        assert!((score("nothing 123456789") - 0.3).abs() < 1e-6);
        // Whole words only.
        assert!((score("lessn 123456789 reorders") - 0.3).abs() < 1e-6);
        // A literal `\n` escape before a word separates it (text pasted from JSON).
        assert!((score(r"x\nSSN:\n123456789") - 0.7).abs() < 1e-6);
        assert!((score("xssn 123456789") - 0.3).abs() < 1e-6);
        // Too far away.
        let far = format!("ssn {} 123456789", "x".repeat(CONTEXT_BEFORE));
        assert!((score(&far) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn overlapping_matches_keep_the_outer_one_and_allow_lists_exempt_values() {
        let text = "id 4111111111111111@example.com and card 4111-1111-1111-1111!";
        assert_eq!(
            scanned(text),
            [
                (EMAIL_ADDRESS, "4111111111111111@example.com"),
                (CREDIT_CARD, "4111-1111-1111-1111")
            ]
        );
        let registry = registry();
        let matches = scan(text, &all(&registry), |entity, value| {
            entity == CREDIT_CARD && canonical(entity, value) == "4111111111111111"
        });
        assert_eq!(
            matches.iter().map(|m| m.entity_type).collect::<Vec<_>>(),
            [EMAIL_ADDRESS]
        );
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(
            canonical(CREDIT_CARD, "4111 1111-1111.1111"),
            "4111111111111111"
        );
        assert_eq!(canonical(IBAN_CODE, "de89 3704"), "DE893704");
        assert_eq!(
            canonical(EMAIL_ADDRESS, "Jane@Example.COM"),
            "jane@example.com"
        );
        assert_eq!(canonical(JWT, "eyJ.A.b"), "eyJ.A.b");
    }
}
