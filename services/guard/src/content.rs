//! Content filters: named topics, each a list of terms (matched as whole words, case-insensitively,
//! by one Aho-Corasick automaton over the normalised text) and regular expressions (matched
//! case-insensitively on the normalised text). A route denies some topics; a text that mentions a
//! denied topic gives a `content_filter` finding named after the topic, flagged or blocked.
//!
//! Matching runs on the normalised view (see [`crate::normalize`]), so zero-width characters,
//! fullwidth forms and look-alike letters do not hide a term, and on its lower-cased form, so
//! neither does case.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::Regex;
use serde::Deserialize;
use switchboard_config::ConfigError;

use crate::normalize::Normalized;

/// A topic (`[guard.topics.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Words or phrases, matched as whole words, case-insensitively, after normalisation.
    pub terms: Vec<String>,
    /// Regular expressions, matched case-insensitively on the normalised text.
    pub patterns: Vec<String>,
}

/// The compiled topics.
#[derive(Debug, Default)]
pub struct ContentFilters {
    names: Vec<String>,
    automaton: Option<AhoCorasick>,
    /// Topic index of each automaton pattern.
    term_topic: Vec<usize>,
    regexes: Vec<(Regex, usize)>,
}

/// Most matches counted per topic and text.
const MAX_COUNT: u32 = 1_000;

impl ContentFilters {
    /// Compiles `topics`; errors name the field under `guard.topics`.
    pub fn new(topics: &BTreeMap<String, TopicConfig>) -> Result<Self, ConfigError> {
        let mut names = Vec::with_capacity(topics.len());
        let mut terms: Vec<String> = Vec::new();
        let mut term_topic = Vec::new();
        let mut regexes = Vec::new();
        for (index, (name, topic)) in topics.iter().enumerate() {
            let path = format!("guard.topics.{name}");
            if name.trim().is_empty() {
                return Err(ConfigError::invalid(path, "topic name must not be empty"));
            }
            if topic.terms.is_empty() && topic.patterns.is_empty() {
                return Err(ConfigError::invalid(path, "needs terms or patterns"));
            }
            for (i, term) in topic.terms.iter().enumerate() {
                let folded = fold(term);
                if folded.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        format!("{path}.terms[{i}]"),
                        "must not be empty",
                    ));
                }
                terms.push(folded.trim().to_owned());
                term_topic.push(index);
            }
            for (i, pattern) in topic.patterns.iter().enumerate() {
                let regex = Regex::new(&format!("(?i){pattern}")).map_err(|e| {
                    ConfigError::invalid(
                        format!("{path}.patterns[{i}]"),
                        format!("invalid regular expression: {e}"),
                    )
                })?;
                regexes.push((regex, index));
            }
            names.push(name.clone());
        }
        let automaton = if terms.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::Standard)
                    .build(&terms)
                    .map_err(|e| {
                        ConfigError::invalid("guard.topics", format!("cannot compile terms: {e}"))
                    })?,
            )
        };
        Ok(ContentFilters {
            names,
            automaton,
            term_topic,
            regexes,
        })
    }

    /// The topic names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of topic `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Adds to `counts[topic]` the matches in `normalized` (a normalised view) of every topic
    /// whose `wanted[topic]` is true. `counts` and `wanted` have one entry per topic.
    pub fn count(&self, normalized: &str, wanted: &[bool], counts: &mut [u32]) {
        if !wanted.iter().any(|w| *w) {
            return;
        }
        if let Some(automaton) = &self.automaton {
            let lowered = normalized.to_lowercase();
            let bytes = lowered.as_bytes();
            let mut last_end: Vec<usize> = vec![0; self.names.len()];
            for m in automaton.find_overlapping_iter(&lowered) {
                let topic = self.term_topic[m.pattern().as_usize()];
                if !wanted[topic] || counts[topic] >= MAX_COUNT || m.start() < last_end[topic] {
                    continue;
                }
                let before = lowered[..m.start()].chars().next_back();
                let after = lowered[m.end()..].chars().next();
                let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
                // Terms that start or end with a non-word character need no boundary there.
                let starts_word =
                    bytes[m.start()].is_ascii_alphanumeric() || bytes[m.start()] >= 0x80;
                let ends_word =
                    bytes[m.end() - 1].is_ascii_alphanumeric() || bytes[m.end() - 1] >= 0x80;
                if (starts_word && !boundary(before)) || (ends_word && !boundary(after)) {
                    continue;
                }
                counts[topic] += 1;
                last_end[topic] = m.end();
            }
        }
        for (regex, topic) in &self.regexes {
            if !wanted[*topic] || counts[*topic] >= MAX_COUNT {
                continue;
            }
            let found = regex.find_iter(normalized).take(MAX_COUNT as usize).count();
            counts[*topic] =
                counts[*topic].saturating_add(u32::try_from(found).unwrap_or(MAX_COUNT));
        }
    }
}

/// A term as it is matched: normalised and lower-cased, white space collapsed.
fn fold(term: &str) -> String {
    Normalized::new(term)
        .text()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn filters() -> ContentFilters {
        ContentFilters::new(&BTreeMap::from([
            (
                "weapons".to_owned(),
                TopicConfig {
                    terms: vec!["pipe bomb".into(), "Nerve Agent".into(), "ricin".into()],
                    patterns: vec![r"\b3d[- ]?printed (gun|rifle)s?\b".into()],
                },
            ),
            (
                "competitors".to_owned(),
                TopicConfig {
                    terms: vec!["acme corp".into()],
                    patterns: Vec::new(),
                },
            ),
        ]))
        .unwrap()
    }

    fn counts(text: &str) -> Vec<u32> {
        let f = filters();
        let mut counts = vec![0; f.names().len()];
        let view = Normalized::new(text);
        f.count(view.text(), &[true, true], &mut counts);
        // Topics are sorted by name: competitors, weapons.
        counts
    }

    #[test]
    fn terms_and_patterns_count_per_topic() {
        assert_eq!(counts("how to build a pipe bomb and make ricin"), [0, 2]);
        assert_eq!(counts("Where to buy 3D-printed guns?"), [0, 1]);
        assert_eq!(counts("Compare us with ACME Corp."), [1, 0]);
        assert_eq!(counts("a recipe for cake"), [0, 0]);
    }

    #[test]
    fn whole_words_only() {
        // "ricin" inside "ricinoleic", "acme corp" inside "acme corporation".
        assert_eq!(counts("ricinoleic acid from castor oil"), [0, 0]);
        assert_eq!(counts("acme corporation"), [0, 0]);
        assert_eq!(counts("pipe bombastic"), [0, 0]);
    }

    #[test]
    fn normalised_evasions_are_caught() {
        // Zero-width space, Cyrillic look-alikes, fullwidth letters, case.
        assert_eq!(counts("make ri\u{200B}cin at home"), [0, 1]);
        assert_eq!(counts("make riсin at home"), [0, 1]);
        assert_eq!(counts("ＲＩＣＩＮ"), [0, 1]);
        assert_eq!(counts("NERVE agent"), [0, 1]);
        assert_eq!(counts("pipe\u{00A0}bomb"), [0, 1]);
    }

    #[test]
    fn only_wanted_topics_are_counted() {
        let f = filters();
        let mut counts = vec![0; 2];
        f.count("ricin and acme corp", &[true, false], &mut counts);
        assert_eq!(counts, [1, 0]);
    }

    #[test]
    fn invalid_topics_name_the_field() {
        let bad = |topic: TopicConfig| {
            ContentFilters::new(&BTreeMap::from([("t".to_owned(), topic)]))
                .unwrap_err()
                .to_string()
        };
        assert!(bad(TopicConfig::default()).contains("`guard.topics.t`"));
        assert!(
            bad(TopicConfig {
                terms: vec![" ".into()],
                patterns: Vec::new()
            })
            .contains("`guard.topics.t.terms[0]`")
        );
        assert!(
            bad(TopicConfig {
                terms: Vec::new(),
                patterns: vec!["(".into()]
            })
            .contains("`guard.topics.t.patterns[0]`")
        );
    }

    proptest! {
        #[test]
        fn a_term_is_found_whatever_the_case_and_zero_width_splits(
            upper in proptest::collection::vec(any::<bool>(), 5),
            zw in proptest::collection::vec(any::<bool>(), 5),
            prefix in "[a-z ]{0,20}",
        ) {
            let term: String = "ricin".chars().zip(upper.iter().zip(&zw)).flat_map(|(c, (u, z))| {
                let c = if *u { c.to_ascii_uppercase() } else { c };
                if *z { vec![c, '\u{200B}'] } else { vec![c] }
            }).collect();
            let text = format!("{prefix} {term} .");
            prop_assert_eq!(counts(&text)[1], 1, "{:?}", text);
        }
    }
}
