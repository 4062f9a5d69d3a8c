//! Reversible pseudonyms: `<EMAIL_ADDRESS_1>` placeholders in what the provider sees, restored in
//! the answer before it reaches the caller.
//!
//! The guard returns the mapping (placeholder → original value) with a `pseudonymize` decision;
//! the caller keeps it for the request only and never logs it. [`restore`] rewrites a whole text;
//! [`Restorer`] rewrites a stream of chunks and holds back a possible placeholder split across
//! chunk boundaries (`…<EMAIL_AD` + `DRESS_1> …`).
//!
//! The guard builds the mapping, the gateway restores answers with it. Neither type prints a value
//! or any text: their `Debug` shows sizes only.

use std::{collections::HashMap, fmt};

/// Placeholder → original value. `Debug` prints the number of placeholders only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    values: HashMap<String, String>,
    longest: usize,
}

impl Mapping {
    /// An empty mapping.
    pub fn new() -> Self {
        Mapping::default()
    }

    /// Adds `placeholder` (e.g. `<EMAIL_ADDRESS_1>`) for `value`.
    pub fn insert(&mut self, placeholder: String, value: String) {
        self.longest = self.longest.max(placeholder.len());
        self.values.insert(placeholder, value);
    }

    /// The value of `placeholder`.
    pub fn get(&self, placeholder: &str) -> Option<&str> {
        self.values.get(placeholder).map(String::as_str)
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Number of placeholders.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Placeholder and value pairs, sorted by placeholder.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs
    }
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("len", &self.values.len())
            .finish_non_exhaustive()
    }
}

impl FromIterator<(String, String)> for Mapping {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut mapping = Mapping::new();
        for (placeholder, value) in iter {
            mapping.insert(placeholder, value);
        }
        mapping
    }
}

/// Whether `b` can appear between `<` and `>` of a placeholder.
fn placeholder_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'
}

/// Restores the placeholders of `mapping` in `text`. Unknown placeholders are left as they are;
/// restored values are never scanned again.
pub fn restore(text: &str, mapping: &Mapping) -> String {
    let mut out = String::with_capacity(text.len());
    restore_into(text, mapping, &mut out, true);
    out
}

/// Restores into `out` and returns how many bytes of `text` were consumed: all of it when `last`,
/// otherwise everything up to a trailing possible placeholder prefix.
fn restore_into(text: &str, mapping: &Mapping, out: &mut String, last: bool) -> usize {
    let bytes = text.as_bytes();
    let mut copied = 0;
    let mut at = 0;
    while let Some(offset) = bytes[at..].iter().position(|&b| b == b'<') {
        let open = at + offset;
        let body = bytes[open + 1..]
            .iter()
            .take_while(|&&b| placeholder_byte(b))
            .count();
        let close = open + 1 + body;
        match bytes.get(close) {
            Some(b'>') => {
                if let Some(value) = mapping.get(&text[open..=close]) {
                    out.push_str(&text[copied..open]);
                    out.push_str(value);
                    copied = close + 1;
                }
                at = close + 1;
            }
            // The text ends inside what may still become a placeholder.
            None if !last && close - open < mapping.longest => {
                out.push_str(&text[copied..open]);
                return open;
            }
            _ => at = open + 1,
        }
    }
    out.push_str(&text[copied..]);
    text.len()
}

/// Restores placeholders in a stream of chunks. `Debug` prints sizes only.
pub struct Restorer {
    mapping: Mapping,
    pending: String,
}

impl fmt::Debug for Restorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Restorer")
            .field("mapping", &self.mapping)
            .field("pending_bytes", &self.pending.len())
            .finish()
    }
}

impl Restorer {
    /// A restorer for `mapping`.
    pub fn new(mapping: Mapping) -> Self {
        Restorer {
            mapping,
            pending: String::new(),
        }
    }

    /// Restores `chunk` and returns what can be emitted now; a possible placeholder at its end is
    /// held back until the next chunk (at most the longest placeholder's length).
    pub fn push(&mut self, chunk: &str) -> String {
        if self.mapping.is_empty() {
            return chunk.to_owned();
        }
        self.pending.push_str(chunk);
        let mut out = String::with_capacity(self.pending.len());
        let consumed = restore_into(&self.pending, &self.mapping, &mut out, false);
        self.pending.drain(..consumed);
        out
    }

    /// Ends the stream: what was held back, restored where possible.
    pub fn finish(&mut self) -> String {
        let pending = std::mem::take(&mut self.pending);
        restore(&pending, &self.mapping)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mapping() -> Mapping {
        [
            ("<EMAIL_ADDRESS_1>", "jane@example.com"),
            ("<EMAIL_ADDRESS_2>", "bob@example.org"),
            ("<CREDIT_CARD_1>", "4111 1111 1111 1111"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn restore_replaces_known_placeholders_only() {
        let m = mapping();
        assert_eq!(
            restore("Hi <EMAIL_ADDRESS_1>, card <CREDIT_CARD_1>.", &m),
            "Hi jane@example.com, card 4111 1111 1111 1111."
        );
        assert_eq!(
            restore("<EMAIL_ADDRESS_1><EMAIL_ADDRESS_2>", &m),
            "jane@example.combob@example.org"
        );
        for text in [
            "<EMAIL_ADDRESS_3>",
            "a < b > c",
            "<<EMAIL_ADDRESS_1",
            "<>",
            "<EMAIL_ADDRESS_1",
            "x<",
        ] {
            assert_eq!(restore(text, &m), text);
        }
        assert_eq!(restore("<<EMAIL_ADDRESS_1>>", &m), "<jane@example.com>");
        // A restored value is not restored again.
        let tricky: Mapping = [("<A_1>".to_owned(), "<A_1>".to_owned())]
            .into_iter()
            .collect();
        assert_eq!(restore("<A_1>", &tricky), "<A_1>");
    }

    #[test]
    fn the_streaming_restorer_handles_split_placeholders() {
        let mut r = Restorer::new(mapping());
        let mut out = String::new();
        for chunk in [
            "Hi <EMAIL_AD",
            "DRESS_1>, and <",
            "CREDIT_CARD_1",
            "> bye <EMA",
        ] {
            out.push_str(&r.push(chunk));
        }
        assert_eq!(out, "Hi jane@example.com, and 4111 1111 1111 1111 bye ");
        assert_eq!(r.finish(), "<EMA");
        // Not a placeholder after all: released as soon as that is clear.
        let mut r = Restorer::new(mapping());
        assert_eq!(r.push("a <b"), "a <b");
        assert_eq!(r.push("x <EMAIL"), "x ");
        assert_eq!(r.push(" y"), "<EMAIL y");
        // A long run of placeholder characters is not held back for ever.
        let long = format!("<{}", "A".repeat(100));
        assert_eq!(r.push(&long), long);
    }

    #[test]
    fn debug_never_prints_a_value() {
        let mut r = Restorer::new(mapping());
        let _ = r.push("secret text <EMAIL_AD");
        let shown = format!("{:?} {:?}", mapping(), r);
        assert!(!shown.contains("jane") && !shown.contains("EMAIL") && !shown.contains("secret"));
        assert!(shown.contains("len: 3"));
    }

    proptest! {
        #[test]
        fn streaming_equals_whole_text_restore(
            parts in proptest::collection::vec(prop_oneof![
                Just("<EMAIL_ADDRESS_1>".to_owned()),
                Just("<CREDIT_CARD_1>".to_owned()),
                Just("<EMAIL_ADDRESS_9>".to_owned()),
                "[a-z <>_A-Z0-9é]{0,12}",
            ], 0..12),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let text: String = parts.concat();
            let m = mapping();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).filter(|&c| text.is_char_boundary(c)).collect();
            points.push(0);
            points.push(text.len());
            points.sort_unstable();
            let mut r = Restorer::new(m.clone());
            let mut out = String::new();
            for w in points.windows(2) {
                out.push_str(&r.push(&text[w[0]..w[1]]));
            }
            out.push_str(&r.finish());
            prop_assert_eq!(out, restore(&text, &m));
        }
    }
}
