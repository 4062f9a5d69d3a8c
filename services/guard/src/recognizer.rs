//! Recognisers: each finds one entity type in a text. New entity types are added by implementing
//! [`Recognizer`] and registering it in [`Registry::builtin`] (and its name in [`KNOWN_ENTITIES`]).

use std::ops::Range;

use regex::Regex;

/// Email addresses.
pub const EMAIL_ADDRESS: &str = "EMAIL_ADDRESS";
/// Payment card numbers (Luhn-checked).
pub const CREDIT_CARD: &str = "CREDIT_CARD";

/// Every entity type the guard can recognise (configuration is validated against this list).
pub const KNOWN_ENTITIES: &[&str] = &[EMAIL_ADDRESS, CREDIT_CARD];

/// Finds the occurrences of one entity type in a text.
pub trait Recognizer: Send + Sync {
    /// The entity type, as used in configuration and findings (e.g. `EMAIL_ADDRESS`).
    fn entity_type(&self) -> &'static str;
    /// Byte ranges of the matches in `text`, in order and not overlapping.
    fn find(&self, text: &str) -> Vec<Range<usize>>;
}

/// The recognisers available to policies, by entity type.
pub struct Registry {
    recognizers: Vec<Box<dyn Recognizer>>,
}

impl Registry {
    /// The built-in recognisers (one per entry of [`KNOWN_ENTITIES`]).
    pub fn builtin() -> Result<Self, regex::Error> {
        Ok(Registry {
            recognizers: vec![
                Box::new(EmailRecognizer::new()?),
                Box::new(CreditCardRecognizer::new()?),
            ],
        })
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Entity type of the recogniser that matched.
    pub entity_type: &'static str,
    /// Byte range in the text.
    pub range: Range<usize>,
}

/// Runs `recognizers` over `text`. Overlapping matches are resolved in favour of the one that starts
/// first, then the longer one, so every byte is attributed to at most one entity.
pub fn scan(text: &str, recognizers: &[&dyn Recognizer]) -> Vec<Match> {
    let mut all: Vec<Match> = recognizers
        .iter()
        .flat_map(|r| {
            r.find(text).into_iter().map(|range| Match {
                entity_type: r.entity_type(),
                range,
            })
        })
        .collect();
    all.sort_by(|a, b| {
        a.range
            .start
            .cmp(&b.range.start)
            .then(b.range.end.cmp(&a.range.end))
    });
    let mut kept: Vec<Match> = Vec::with_capacity(all.len());
    for m in all {
        if kept
            .last()
            .is_none_or(|last| m.range.start >= last.range.end)
        {
            kept.push(m);
        }
    }
    kept
}

/// Replaces every match with `[ENTITY_TYPE]`, keeping the text around it.
pub fn redact(text: &str, matches: &[Match]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for m in matches {
        out.push_str(&text[at..m.range.start]);
        out.push('[');
        out.push_str(m.entity_type);
        out.push(']');
        at = m.range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// `local@domain.tld`: a dot-atom local part, one or more domain labels and an alphabetic TLD of at
/// least two letters. `a@b` and `@handle` do not match.
pub struct EmailRecognizer {
    regex: Regex,
}

impl EmailRecognizer {
    /// Compiles the pattern.
    pub fn new() -> Result<Self, regex::Error> {
        let local = r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*";
        let label = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?";
        let regex = Regex::new(&format!(r"{local}@(?:{label}\.)+[A-Za-z]{{2,63}}"))?;
        Ok(EmailRecognizer { regex })
    }
}

impl Recognizer for EmailRecognizer {
    fn entity_type(&self) -> &'static str {
        EMAIL_ADDRESS
    }

    fn find(&self, text: &str) -> Vec<Range<usize>> {
        self.regex
            .find_iter(text)
            // The TLD must end the domain: `a@b.com1` or `a@b.co-x` is not an address ending in `.co`.
            .filter(|m| {
                !text[m.end()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            })
            .map(|m| m.range())
            .collect()
    }
}

/// 13 to 19 ASCII digits, optionally separated by single spaces or dashes, passing the Luhn check.
/// A candidate is a maximal run of digits and single separators, so a card is never found inside a
/// longer number.
pub struct CreditCardRecognizer {
    regex: Regex,
}

impl CreditCardRecognizer {
    /// Compiles the pattern.
    pub fn new() -> Result<Self, regex::Error> {
        Ok(CreditCardRecognizer {
            regex: Regex::new(r"[0-9](?:[ \-]?[0-9])*")?,
        })
    }
}

impl Recognizer for CreditCardRecognizer {
    fn entity_type(&self) -> &'static str {
        CREDIT_CARD
    }

    fn find(&self, text: &str) -> Vec<Range<usize>> {
        self.regex
            .find_iter(text)
            .filter(|m| {
                let digits: Vec<u8> = m
                    .as_str()
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                (13..=19).contains(&digits.len()) && luhn_valid(&digits)
            })
            .map(|m| m.range())
            .collect()
    }
}

/// The Luhn checksum over decimal digits (values 0..=9).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn email() -> EmailRecognizer {
        EmailRecognizer::new().unwrap()
    }
    fn card() -> CreditCardRecognizer {
        CreditCardRecognizer::new().unwrap()
    }
    fn found<'a>(r: &dyn Recognizer, text: &'a str) -> Vec<&'a str> {
        r.find(text).into_iter().map(|range| &text[range]).collect()
    }

    /// Appends the Luhn check digit to `body`.
    fn with_check_digit(body: &[u8]) -> Vec<u8> {
        let mut digits = body.to_vec();
        digits.push(0);
        for check in 0..10 {
            if let Some(last) = digits.last_mut() {
                *last = check;
            }
            if luhn_valid(&digits) {
                break;
            }
        }
        digits
    }

    fn render(digits: &[u8], separator: Option<char>, group: usize) -> String {
        let mut out = String::new();
        for (i, d) in digits.iter().enumerate() {
            if i > 0
                && i % group == 0
                && let Some(sep) = separator
            {
                out.push(sep);
            }
            out.push(char::from(b'0' + d));
        }
        out
    }

    #[test]
    fn luhn_known_values() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn_valid(&digits("4111111111111111")));
        assert!(luhn_valid(&digits("378282246310005")));
        assert!(luhn_valid(&digits("79927398713")));
        assert!(!luhn_valid(&digits("4111111111111112")));
        assert!(!luhn_valid(&digits("79927398710")));
    }

    #[test]
    fn cards_in_common_formats_are_found() {
        let r = card();
        assert_eq!(
            found(&r, "pay with 4111111111111111 now"),
            ["4111111111111111"]
        );
        assert_eq!(
            found(&r, "pay with 4111 1111 1111 1111."),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(&r, "amex 3782-822463-10005, ok"),
            ["3782-822463-10005"]
        );
        assert_eq!(
            found(&r, "a 4111111111111111 and 5500 0000 0000 0004"),
            ["4111111111111111", "5500 0000 0000 0004"]
        );
    }

    #[test]
    fn non_cards_are_not_found() {
        let r = card();
        // Fails Luhn.
        assert!(found(&r, "4111111111111112").is_empty());
        // Too short / too long (both Luhn-valid).
        assert!(found(&r, "79927398713").is_empty());
        assert!(found(&r, "41111111111111111111113").is_empty());
        // A valid card embedded in a longer number is not a card.
        assert!(found(&r, "94111111111111111").is_empty());
        // Double separators break the run.
        assert!(found(&r, "4111  1111  1111  1111").is_empty());
        // Unicode digits are not card digits.
        assert!(found(&r, "٤١١١١١١١١١١١١١١١").is_empty());
    }

    #[test]
    fn emails_are_found() {
        let r = email();
        assert_eq!(
            found(&r, "mail jane.doe+tag@example.co.uk today"),
            ["jane.doe+tag@example.co.uk"]
        );
        assert_eq!(
            found(&r, "<a_b@sub-domain.example.org>."),
            ["a_b@sub-domain.example.org"]
        );
        assert_eq!(found(&r, "x@y.io, z@w.dev"), ["x@y.io", "z@w.dev"]);
        assert_eq!(found(&r, "Mail: ME@EXAMPLE.COM"), ["ME@EXAMPLE.COM"]);
    }

    #[test]
    fn non_emails_are_not_found() {
        let r = email();
        for text in [
            "a@b",
            "@handle",
            "ping @handle now",
            "a@b.c",
            "user@",
            "a@-b.com",
            "a@b.com1",
            "x@.com",
            "a@b..com",
        ] {
            assert!(found(&r, text).is_empty(), "{text}");
        }
    }

    #[test]
    fn overlapping_matches_keep_the_outer_one_and_redaction_keeps_surroundings() {
        let registry = Registry::builtin().unwrap();
        let recognizers: Vec<&dyn Recognizer> = KNOWN_ENTITIES
            .iter()
            .map(|e| registry.get(e).unwrap())
            .collect();
        let text = "id 4111111111111111@example.com and card 4111-1111-1111-1111!";
        let matches = scan(text, &recognizers);
        assert_eq!(
            matches.iter().map(|m| m.entity_type).collect::<Vec<_>>(),
            [EMAIL_ADDRESS, CREDIT_CARD]
        );
        assert_eq!(
            redact(text, &matches),
            "id [EMAIL_ADDRESS] and card [CREDIT_CARD]!"
        );
    }

    #[test]
    fn registry_covers_every_known_entity() {
        let registry = Registry::builtin().unwrap();
        for entity in KNOWN_ENTITIES {
            assert_eq!(registry.get(entity).map(|r| r.entity_type()), Some(*entity));
        }
        assert!(registry.get("PHONE_NUMBER").is_none());
    }

    fn card_digits() -> impl Strategy<Value = Vec<u8>> {
        (12usize..=18)
            .prop_flat_map(|len| proptest::collection::vec(0u8..10, len))
            .prop_map(|b| with_check_digit(&b))
    }
    fn separator() -> impl Strategy<Value = (Option<char>, usize)> {
        (
            prop_oneof![Just(None), Just(Some(' ')), Just(Some('-'))],
            3usize..=6,
        )
    }
    /// Text with no ASCII digit and no `@`, so it contains no entity of its own.
    fn plain_text() -> impl Strategy<Value = String> {
        "[^0-9@]{0,40}"
    }

    proptest! {
        #[test]
        fn valid_cards_are_found_in_arbitrary_text(
            digits in card_digits(), (sep, group) in separator(), prefix in "\\PC{0,40}", suffix in "\\PC{0,40}",
        ) {
            let card_text = render(&digits, sep, group);
            let text = format!("{prefix} card {card_text}. {suffix}");
            let start = prefix.len() + " card ".len();
            let card_range = start..start + card_text.len();
            let ranges = card().find(&text);
            prop_assert!(
                ranges.iter().any(|r| r.start <= card_range.start && card_range.end <= r.end),
                "card {card_text:?} not found in {text:?}: {ranges:?}"
            );
        }

        #[test]
        fn redaction_keeps_the_surrounding_text(
            digits in card_digits(), (sep, group) in separator(), prefix in plain_text(), suffix in plain_text(),
        ) {
            let registry = Registry::builtin().unwrap();
            let recognizers: Vec<&dyn Recognizer> =
                KNOWN_ENTITIES.iter().map(|e| registry.get(e).unwrap()).collect();
            let text = format!("{prefix} {} {suffix}", render(&digits, sep, group));
            let matches = scan(&text, &recognizers);
            prop_assert_eq!(redact(&text, &matches), format!("{prefix} [CREDIT_CARD] {suffix}"));
        }

        #[test]
        fn luhn_failing_numbers_are_not_found(
            body in card_digits(), bump in 1u8..10, (sep, group) in separator(),
            prefix in plain_text(), suffix in plain_text(),
        ) {
            let mut digits = body;
            if let Some(last) = digits.last_mut() {
                *last = (*last + bump) % 10;
            }
            prop_assert!(!luhn_valid(&digits));
            let text = format!("{prefix} {} {suffix}", render(&digits, sep, group));
            prop_assert!(card().find(&text).is_empty(), "{text:?}");
        }

        #[test]
        fn random_digit_strings_are_found_exactly_when_luhn_valid(digits in proptest::collection::vec(0u8..10, 1..30)) {
            let text = render(&digits, None, 1);
            let expected = (13..=19).contains(&digits.len()) && luhn_valid(&digits);
            prop_assert_eq!(!card().find(&text).is_empty(), expected);
        }

        #[test]
        fn generated_emails_are_found(
            local in "[a-z0-9_%+-]{1,10}(\\.[a-z0-9_%+-]{1,10}){0,2}",
            labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", 1..4),
            tld in "[a-z]{2,6}",
            prefix in plain_text(), suffix in plain_text(),
        ) {
            let address = format!("{local}@{}.{tld}", labels.join("."));
            let text = format!("{prefix} <{address}> {suffix}");
            prop_assert_eq!(found(&email(), &text), vec![address.as_str()]);
        }

        #[test]
        fn text_without_at_sign_has_no_email(text in "[^@]{0,80}") {
            prop_assert!(email().find(&text).is_empty());
        }
    }
}
