//! Personal data recognisers: email, payment card, phone, US SSN, IBAN, IP address, URL credentials.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
    sync::OnceLock,
};

use phonenumber::country;
use regex::Regex;

use super::{
    CREDIT_CARD, Candidate, Context, EMAIL_ADDRESS, IBAN_CODE, IP_ADDRESS, Input, PHONE_NUMBER,
    Recognizer, URL_CREDENTIALS, US_SSN, collect_digits, escape_before, word_near,
};

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

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        if !text.contains('@') {
            return;
        }
        out.extend(
            self.regex
                .find_iter(text)
                // The TLD must end the domain: `a@b.com1` or `a@b.co-x` is not an address ending in `.co`.
                .filter(|m| {
                    !text[m.end()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
                })
                .map(|m| Candidate {
                    range: m.range(),
                    score: 0.9,
                }),
        );
    }
}

/// Payment cards, passing the Luhn check, in digit groups (spaced-out, dash- or dot-separated
/// digits are joined). A group of digits is never split, so a card is never found inside a longer
/// number; in a run of several groups the best window of whole groups is taken (highest
/// confidence, then longest: a card followed by its CVV is still found). Confidence:
/// - 0.8: 13–19 digits in a known issuer range and length (Visa, Mastercard, Amex, Discover, JCB,
///   UnionPay, Diners, Mir, Troy, RuPay);
/// - 0.6: Maestro (50, 56–69) with 13–19 digits;
/// - 0.35, so only with a card word nearby ("card", "credit", "visa", …): a 12-digit Maestro
///   number, or 13–19 digits in no known range (new ranges appear; a Luhn-valid number next to
///   the word "card" is a card whatever its issuer).
pub struct CreditCardRecognizer;

static CARD_CONTEXT: Context = Context {
    raise: &[
        "card",
        "credit",
        "debit",
        "visa",
        "mastercard",
        "amex",
        "maestro",
        "jcb",
        "cc",
        "cvv",
        "expiry",
        "exp",
        "payment",
        "pay",
    ],
    lower: &[
        "order",
        "invoice",
        "tracking",
        "ref",
        "reference",
        "serial",
        "isbn",
        "sku",
        "transaction",
        "confirmation",
        "ticket",
    ],
    boost: 0.2,
    penalty: 0.4,
};

/// Confidence of a Luhn-valid number in a known range of a card network.
const CARD_KNOWN: f32 = 0.8;
/// Confidence of a Maestro number of 13–19 digits.
const CARD_MAESTRO: f32 = 0.6;
/// Confidence of a Luhn-valid number no known range explains (needs a card word).
const CARD_UNKNOWN_RANGE: f32 = 0.35;

/// The card network of an issuer prefix and length, if any (Maestro last: its ranges are broad).
pub fn card_issuer(digits: &[u8]) -> Option<&'static str> {
    let prefix = |n: usize| -> u32 {
        digits
            .iter()
            .take(n)
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let len = digits.len();
    let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
    if p1 == 4 && matches!(len, 13 | 16 | 19) {
        return Some("visa");
    }
    if ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16 {
        return Some("mastercard");
    }
    if matches!(p2, 34 | 37) && len == 15 {
        return Some("amex");
    }
    if (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || (622126..=622925).contains(&p6))
        && (16..=19).contains(&len)
    {
        return Some("discover");
    }
    // JCB, and its older 15-digit ranges 1800 and 2131.
    if ((3528..=3589).contains(&p4) && (16..=19).contains(&len))
        || (matches!(p4, 1800 | 2131) && len == 15)
    {
        return Some("jcb");
    }
    if (p2 == 62 || (8100..=8171).contains(&p4)) && (16..=19).contains(&len) {
        return Some("unionpay");
    }
    if ((300..=305).contains(&p3) || p3 == 309 || matches!(p2, 36 | 38 | 39))
        && (14..=19).contains(&len)
    {
        return Some("diners");
    }
    if (2200..=2204).contains(&p4) && (16..=19).contains(&len) {
        return Some("mir");
    }
    if p4 == 9792 && len == 16 {
        return Some("troy");
    }
    if (p3 == 508 || p2 == 60 || matches!(p2, 81 | 82)) && len == 16 {
        return Some("rupay");
    }
    if (p2 == 50 || (56..=69).contains(&p2)) && (12..=19).contains(&len) {
        return Some("maestro");
    }
    None
}

/// The base confidence of `digits` as a card number (see [`CreditCardRecognizer`]), if any.
pub fn card_score(digits: &[u8]) -> Option<f32> {
    if !(12..=19).contains(&digits.len()) || !luhn_valid(digits) {
        return None;
    }
    match card_issuer(digits) {
        Some("maestro") if digits.len() == 12 => Some(CARD_UNKNOWN_RANGE),
        Some("maestro") => Some(CARD_MAESTRO),
        Some(_) => Some(CARD_KNOWN),
        None if digits.len() >= 13 => Some(CARD_UNKNOWN_RANGE),
        None => None,
    }
}

impl Recognizer for CreditCardRecognizer {
    fn entity_type(&self) -> &'static str {
        CREDIT_CARD
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let runs = input.digit_runs();
        let mut digits = Vec::with_capacity(19);
        for run in &runs.runs {
            let groups = &runs.groups[run.clone()];
            let mut i = 0;
            while i < groups.len() {
                // The most confident (then longest) window of whole groups starting at `i`.
                let mut best: Option<(usize, f32)> = None;
                let mut count = 0;
                for (j, g) in groups.iter().enumerate().skip(i) {
                    count += g.len();
                    if count > 19 {
                        break;
                    }
                    if count >= 12 {
                        collect_digits(text, &groups[i..=j], &mut digits);
                        if let Some(score) = card_score(&digits)
                            && best.is_none_or(|(_, s)| score >= s)
                        {
                            best = Some((j, score));
                        }
                    }
                }
                // A weakly validated number glued to letters is part of an identifier
                // (`U6292878855718`, `ORD5018…`), not a card.
                let glued = |j: usize| {
                    let (first, last) = (groups[i].start, groups[j].end);
                    (first > 0
                        && text.as_bytes()[first - 1].is_ascii_alphabetic()
                        && !escape_before(text.as_bytes(), first))
                        || text
                            .as_bytes()
                            .get(last)
                            .is_some_and(u8::is_ascii_alphabetic)
                };
                match best.filter(|&(j, score)| score >= CARD_KNOWN || !glued(j)) {
                    Some((j, score)) => {
                        out.push(Candidate {
                            range: groups[i].start..groups[j].end,
                            score,
                        });
                        i = j + 1;
                    }
                    None => i += 1,
                }
            }
        }
    }

    fn context(&self) -> &Context {
        &CARD_CONTEXT
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

/// US social security numbers: a whole run of 9 digits with a valid area (not 000, 666 or
/// 900–999), group (not 00) and serial (not 0000), and not a known advertising or sample number.
/// `123-45-6789`-shaped numbers start at 0.6; bare 9 digits at 0.3 and spaced-out ones at 0.4,
/// so those need a context word ("ssn", "social security") to pass the default threshold.
pub struct SsnRecognizer;

static SSN_CONTEXT: Context = Context {
    raise: &[
        "ssn",
        "ssns",
        "ssn#",
        "ss#",
        "social security",
        "social",
        "ssa",
        "taxpayer",
    ],
    lower: &[
        "order", "invoice", "routing", "tracking", "isbn", "ref", "phone", "zip",
    ],
    boost: 0.35,
    penalty: 0.35,
};

/// The SSN rules over 9 digits (values 0..=9).
pub fn ssn_valid(digits: &[u8]) -> bool {
    if digits.len() != 9 {
        return false;
    }
    let number = |r: Range<usize>| {
        digits[r]
            .iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let (area, group, serial) = (number(0..3), number(3..5), number(5..9));
    let whole = number(0..9);
    let all_same = digits.iter().all(|&d| d == digits[0]);
    !(area == 0
        || area == 666
        || area >= 900
        || group == 0
        || serial == 0
        || all_same
        // Woolworth's wallet card, the 1938 sample card, a commonly used fake and the
        // 1990s advertising number.
        || matches!(whole, 78_051_120 | 219_099_999 | 123_456_789 | 457_555_462))
}

impl Recognizer for SsnRecognizer {
    fn entity_type(&self) -> &'static str {
        US_SSN
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let runs = input.digit_runs();
        let mut digits = Vec::with_capacity(9);
        for run in &runs.runs {
            let groups = &runs.groups[run.clone()];
            if groups.iter().map(|g| g.len()).sum::<usize>() != 9 {
                continue;
            }
            collect_digits(text, groups, &mut digits);
            if !ssn_valid(&digits) {
                continue;
            }
            let (first, last) = (groups[0].start, groups[groups.len() - 1].end);
            // Part of something longer (`x123456789`, `123456789y`, `1.123-45-6789`).
            let before = text[..first].chars().next_back();
            let after = text[last..].chars().next();
            if before.is_some_and(char::is_alphanumeric) || after.is_some_and(char::is_alphanumeric)
            {
                continue;
            }
            let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            let score = match lens.as_slice() {
                [9] => 0.3,
                [3, 2, 4] => {
                    let gap1 = &text[groups[0].end..groups[1].start];
                    let gap2 = &text[groups[1].end..groups[2].start];
                    if gap1 == gap2 && (gap1 == "-" || gap1 == " ") {
                        0.6
                    } else {
                        0.4
                    }
                }
                _ => 0.4,
            };
            out.push(Candidate {
                range: first..last,
                score,
            });
        }
    }

    fn context(&self) -> &Context {
        &SSN_CONTEXT
    }
}

/// Phone numbers, parsed and validated with libphonenumber's metadata (the `phonenumber`
/// crate). Confidence:
/// - 0.7: `+` / `00` international numbers valid for their country (any country);
/// - 0.55: formatted national numbers valid for one of the configured regions (in order);
/// - 0.4: bare national digit strings valid there (need a context word such as "phone" or
///   "call");
/// - 0.35: national numbers that are a fixed-line or mobile number of some other region of the
///   metadata (as dialled or after a one-digit trunk prefix), tried only when a context word is
///   near (so they need it: a random digit string fits *somewhere*).
///
/// An extension (`x123`, `ext. 123`, `#123`) after a valid number belongs to its span. A number
/// glued to a date or a time (`2024-01-31 12`, `12:30`) is not a phone number; a literal `\n`,
/// `\t` or `\r` escape before a number counts as a separator (text pasted from JSON).
pub struct PhoneRecognizer {
    regex: Regex,
    extension: Regex,
    regions: Vec<country::Id>,
}

static PHONE_CONTEXT: Context = Context {
    raise: &[
        "phone",
        "phones",
        "tel",
        "telephone",
        "call",
        "mobile",
        "cell",
        "fax",
        "whatsapp",
        "sms",
        "text",
        "message",
        "messages",
        "voicemail",
        "landline",
        "hotline",
        "contact",
        "ring",
        "dial",
    ],
    lower: &[
        "order",
        "invoice",
        "tracking",
        "account",
        "id",
        "ref",
        "reference",
        "isbn",
        "serial",
        "version",
    ],
    boost: 0.3,
    penalty: 0.3,
};

/// Confidence of a number written internationally (`+` or `00`, then a country code) that
/// libphonenumber finds valid: high enough that a nearby lowering word ("id", "order", "ref")
/// does not hide it (0.85 − 0.3 stays above the default threshold 0.5). Such a number is a phone
/// number whatever the words around it.
const PHONE_INTERNATIONAL: f32 = 0.85;

/// Confidence of a national number valid only outside the configured regions (needs context).
const PHONE_OTHER_REGION: f32 = 0.35;

impl PhoneRecognizer {
    /// Compiles the candidate pattern; national numbers are tried for `regions` first.
    pub fn new(regions: &[country::Id]) -> Result<Self, regex::Error> {
        // Loads the metadata now rather than on the first request.
        let _ = phonenumber::parse(Some(country::Id::US), "2025550123");
        let _ = region_patterns();
        Ok(PhoneRecognizer {
            regex: Regex::new(r"\+?\(?[0-9][0-9 ()\-./]{4,24}[0-9]")?,
            extension: Regex::new(r"^(?i:\s?(?:x|ext\.?|extension|#)\s?)[0-9]{1,6}")?,
            regions: regions.to_vec(),
        })
    }

    /// The confidence of `candidate`; `context`: whether a phone context word is near it.
    fn score(&self, candidate: &str, context: bool) -> Option<f32> {
        let digits = candidate.bytes().filter(u8::is_ascii_digit).count();
        if !(7..=15).contains(&digits) || candidate.parse::<Ipv4Addr>().is_ok() {
            return None;
        }
        if is_date(candidate) || candidate.split(' ').any(is_date) {
            return None;
        }
        if candidate.starts_with('+') || candidate.starts_with("00") {
            let international = if let Some(rest) = candidate.strip_prefix("00") {
                format!("+{rest}")
            } else {
                candidate.to_owned()
            };
            if let Ok(number) = phonenumber::parse(None, &international)
                && phonenumber::is_valid(&number)
            {
                return Some(PHONE_INTERNATIONAL);
            }
            if candidate.starts_with('+') {
                return None;
            }
        }
        let valid_in = |region: &country::Id| {
            phonenumber::parse(Some(*region), candidate)
                .is_ok_and(|number| phonenumber::is_valid(&number))
        };
        let formatted = candidate.bytes().any(|b| !b.is_ascii_digit());
        if self.regions.iter().any(valid_in) {
            return Some(if formatted { 0.55 } else { 0.4 });
        }
        (context && region_patterns().any_other(candidate, &self.regions))
            .then_some(PHONE_OTHER_REGION)
    }
}

/// The fixed-line and mobile number patterns of every region (libphonenumber's metadata),
/// compiled once, to check quickly whether a national number is a valid fixed-line or mobile
/// number of some region. (The `phonenumber` crate's own parse per region recompiles patterns
/// through a small LRU cache: tens of milliseconds for one number over all regions.)
struct RegionPatterns {
    /// Per region and number type: id, anchored pattern, possible national lengths (empty: any),
    /// and the region's national (trunk) prefix when it is one digit (`0`, `1`, `8`).
    patterns: Vec<(country::Id, Regex, Vec<u16>, Option<u8>)>,
}

/// The patterns of every region, compiled once per process (a pattern that does not compile is
/// left out).
fn region_patterns() -> &'static RegionPatterns {
    static PATTERNS: OnceLock<RegionPatterns> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        let mut patterns = Vec::new();
        for meta in phonenumber::metadata::DATABASE.iter() {
            let Ok(id) = meta.id().parse::<country::Id>() else {
                continue;
            };
            let trunk = meta
                .national_prefix()
                .filter(|p| p.len() == 1)
                .and_then(|p| p.bytes().next());
            let descriptors = meta.descriptors();
            for descriptor in [descriptors.fixed_line(), descriptors.mobile()]
                .into_iter()
                .flatten()
            {
                // The metadata's patterns are written with insignificant whitespace.
                let source = format!("(?x)^(?:{})$", descriptor.national_number().as_str());
                if let Ok(pattern) = Regex::new(&source) {
                    patterns.push((id, pattern, descriptor.possible_length().to_vec(), trunk));
                }
            }
        }
        RegionPatterns { patterns }
    })
}

impl RegionPatterns {
    /// Whether the digits of `candidate` (as dialled, or without a one-digit trunk prefix) are a
    /// fixed-line or mobile number of a region other than `skip`.
    fn any_other(&self, candidate: &str, skip: &[country::Id]) -> bool {
        let digits: String = candidate.chars().filter(char::is_ascii_digit).collect();
        let first = digits.as_bytes().first().copied();
        let fits = |pattern: &Regex, lengths: &[u16], national: &str| {
            (lengths.is_empty()
                || u16::try_from(national.len()).is_ok_and(|len| lengths.contains(&len)))
                && pattern.is_match(national)
        };
        self.patterns
            .iter()
            .filter(|(id, ..)| !skip.contains(id))
            .any(|(_, pattern, lengths, trunk)| {
                fits(pattern, lengths, &digits)
                    || (trunk.is_some() && *trunk == first && fits(pattern, lengths, &digits[1..]))
            })
    }
}

/// `2024-01-31`, `31/01/2024`, `01.31.2024`: dates, not phone numbers.
fn is_date(candidate: &str) -> bool {
    let parts: Vec<&str> = candidate.split(['-', '/', '.']).collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(lens.as_slice(), [4, 2, 2] | [2, 2, 4] | [1 | 2, 1 | 2, 4])
}

/// Whether the byte before `start` separates a number from what precedes it: anything but a
/// letter, digit, `.`, `-` or `/`; a letter only as the end of a `\n`, `\t` or `\r` escape.
fn separated_before(bytes: &[u8], start: usize) -> bool {
    let Some(before) = start.checked_sub(1).map(|i| bytes[i]) else {
        return true;
    };
    escape_before(bytes, start)
        || !(before.is_ascii_alphanumeric() || matches!(before, b'.' | b'-' | b'/'))
}

impl Recognizer for PhoneRecognizer {
    fn entity_type(&self) -> &'static str {
        PHONE_NUMBER
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let bytes = text.as_bytes();
        for m in self.regex.find_iter(text) {
            let (mut start, end) = (m.start(), m.end());
            if !separated_before(bytes, start) {
                continue;
            }
            // A time (`2024-01-31 12:30`, `12:30:45`), not a number.
            if bytes.get(end) == Some(&b':') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
                continue;
            }
            let extension = self
                .extension
                .find(&text[end..])
                .map(|x| end + x.end())
                .filter(|&x_end| !bytes.get(x_end).is_some_and(u8::is_ascii_alphanumeric));
            if extension.is_none() && bytes.get(end).is_some_and(u8::is_ascii_alphanumeric) {
                continue;
            }
            // An unbalanced opening parenthesis belongs to the prose: `(call 555 …`.
            if bytes[start] == b'(' && !m.as_str().contains(')') {
                start += 1;
            }
            let candidate = &text[start..end];
            let context = word_near(text, &(start..end), PHONE_CONTEXT.raise);
            if let Some(score) = self.score(candidate, context) {
                out.push(Candidate {
                    range: start..extension.unwrap_or(end),
                    score,
                });
            }
        }
    }

    fn context(&self) -> &Context {
        &PHONE_CONTEXT
    }
}

/// IBANs: a country code, two check digits and the country's BBAN length (from the registry's
/// table), single spaces or dashes allowed between characters, passing mod-97.
pub struct IbanRecognizer {
    start: Regex,
}

/// IBAN length per country (SWIFT IBAN registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// The IBAN length of `country` (two upper-case letters).
pub fn iban_length(country: &str) -> Option<usize> {
    IBAN_LENGTHS
        .iter()
        .find(|(c, _)| *c == country)
        .map(|(_, len)| *len)
}

/// Length and mod-97 check of an IBAN (ASCII letters and digits only, any case).
pub fn iban_valid(iban: &str) -> bool {
    let bytes = iban.as_bytes();
    if bytes.len() < 5 || !bytes.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let country = iban[..2].to_ascii_uppercase();
    if iban_length(&country) != Some(bytes.len()) || !bytes[2..4].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in bytes[4..].iter().chain(&bytes[..4]) {
        let b = b.to_ascii_uppercase();
        if b.is_ascii_digit() {
            rem = (rem * 10 + u32::from(b - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

impl IbanRecognizer {
    /// Compiles the pattern.
    pub fn new() -> Result<Self, regex::Error> {
        Ok(IbanRecognizer {
            start: Regex::new(r"(?-u:\b)[A-Za-z]{2}[0-9]{2}")?,
        })
    }
}

impl Recognizer for IbanRecognizer {
    fn entity_type(&self) -> &'static str {
        IBAN_CODE
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let bytes = text.as_bytes();
        let mut compact = String::with_capacity(34);
        let mut resume = 0;
        for m in self.start.find_iter(text) {
            if m.start() < resume {
                continue;
            }
            let Some(len) = iban_length(&m.as_str()[..2].to_ascii_uppercase()) else {
                continue;
            };
            compact.clear();
            compact.push_str(m.as_str());
            let mut at = m.end();
            while compact.len() < len && at < bytes.len() {
                let b = bytes[at];
                if b.is_ascii_alphanumeric() {
                    compact.push(char::from(b));
                    at += 1;
                } else if matches!(b, b' ' | b'-')
                    && bytes.get(at + 1).is_some_and(u8::is_ascii_alphanumeric)
                {
                    at += 1;
                } else {
                    break;
                }
            }
            if compact.len() == len
                && !bytes.get(at).is_some_and(u8::is_ascii_alphanumeric)
                && iban_valid(&compact)
            {
                out.push(Candidate {
                    range: m.start()..at,
                    score: 0.9,
                });
                resume = at;
            }
        }
    }
}

/// IPv4 (dotted quad, no leading zeros) and IPv6 addresses, parsed by the standard library, that
/// are not part of a longer dotted or colon-separated string (`1.2.3.4.5` is a version, not an
/// address). Loopback and unspecified addresses are not personal data (0.2).
pub struct IpRecognizer {
    v4: Regex,
    v6: Regex,
}

static IP_CONTEXT: Context = Context {
    raise: &[
        "ip", "ipv4", "ipv6", "address", "host", "server", "client", "from",
    ],
    lower: &["version", "ver", "v", "release", "build", "oid"],
    boost: 0.2,
    penalty: 0.4,
};

impl IpRecognizer {
    /// Compiles the patterns.
    pub fn new() -> Result<Self, regex::Error> {
        Ok(IpRecognizer {
            v4: Regex::new(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")?,
            v6: Regex::new(
                r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){1,6}:(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9a-f]{0,4})",
            )?,
        })
    }
}

impl Recognizer for IpRecognizer {
    fn entity_type(&self) -> &'static str {
        IP_ADDRESS
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let bytes = text.as_bytes();
        let start = out.len();
        if text.contains('.') {
            for m in self.v4.find_iter(text) {
                let before = m.start().checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(m.end()).copied();
                let dotted_before = before == Some(b'.')
                    && m.start() >= 2
                    && bytes[m.start() - 2].is_ascii_alphanumeric();
                let dotted_after =
                    after == Some(b'.') && bytes.get(m.end() + 1).is_some_and(u8::is_ascii_digit);
                if before.is_some_and(|b| b.is_ascii_alphanumeric())
                    || after.is_some_and(|b| b.is_ascii_alphanumeric())
                    || dotted_before
                    || dotted_after
                {
                    continue;
                }
                if let Ok(ip) = m.as_str().parse::<Ipv4Addr>() {
                    let score = if ip.is_loopback() || ip.is_unspecified() {
                        0.2
                    } else {
                        0.6
                    };
                    out.push(Candidate {
                        range: m.range(),
                        score,
                    });
                }
            }
        }
        if text.contains("::") || text.matches(':').nth(2).is_some() {
            for m in self.v6.find_iter(text) {
                let before = m.start().checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(m.end()).copied();
                if m.len() < 3
                    || before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b':')
                    || after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b':')
                {
                    continue;
                }
                // `a::b` in code and `12:30:45` times: an address has a hex group of 3+ digits or
                // at least 4 groups.
                let s = m.as_str();
                if s.split(':').filter(|g| !g.is_empty()).count() < 3
                    && !s.split(':').any(|g| g.len() >= 3)
                {
                    continue;
                }
                if let Ok(ip) = s.parse::<Ipv6Addr>() {
                    let score = if ip.is_loopback() || ip.is_unspecified() {
                        0.2
                    } else {
                        0.6
                    };
                    out.push(Candidate {
                        range: m.range(),
                        score,
                    });
                }
            }
            out[start..].sort_by_key(|c| c.range.start);
        }
    }

    fn context(&self) -> &Context {
        &IP_CONTEXT
    }
}

/// `scheme://user:password@host`: the `user:password` part.
pub struct UrlCredentialsRecognizer {
    regex: Regex,
}

impl UrlCredentialsRecognizer {
    /// Compiles the pattern.
    pub fn new() -> Result<Self, regex::Error> {
        Ok(UrlCredentialsRecognizer {
            regex: Regex::new(
                r"(?i)(?-u:\b)[a-z][a-z0-9+.\-]{1,30}://([^\s/?#@:]{1,256}:[^\s/?#@]{1,256})@[a-z0-9.\-\[\]:_]+",
            )?,
        })
    }
}

impl Recognizer for UrlCredentialsRecognizer {
    fn entity_type(&self) -> &'static str {
        URL_CREDENTIALS
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        if !text.contains("://") {
            return;
        }
        out.extend(
            self.regex
                .captures_iter(text)
                .filter_map(|c| c.get(1))
                .map(|userinfo| Candidate {
                    range: userinfo.range(),
                    score: 0.9,
                }),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{found, scanned};
    use super::*;
    use proptest::prelude::*;

    fn email() -> EmailRecognizer {
        EmailRecognizer::new().unwrap()
    }
    fn phone() -> PhoneRecognizer {
        PhoneRecognizer::new(&[country::Id::US, country::Id::GB]).unwrap()
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

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_known_values() {
        assert!(luhn_valid(&digits("4111111111111111")));
        assert!(luhn_valid(&digits("378282246310005")));
        assert!(luhn_valid(&digits("79927398713")));
        assert!(!luhn_valid(&digits("4111111111111112")));
        assert!(!luhn_valid(&digits("79927398710")));
    }

    #[test]
    fn issuer_ranges_and_lengths() {
        for (number, issuer) in [
            ("4111111111111111", "visa"),
            ("4222222222222", "visa"),
            ("5500000000000004", "mastercard"),
            ("2223003122003222", "mastercard"),
            ("378282246310005", "amex"),
            ("6011111111111117", "discover"),
            ("6445644564456445", "discover"),
            ("3530111333300000", "jcb"),
            ("6200000000000005", "unionpay"),
            ("30569309025904", "diners"),
            ("36227206271667", "diners"),
        ] {
            let d = digits(number);
            assert_eq!(card_issuer(&d), Some(issuer), "{number}");
            assert!(luhn_valid(&d), "{number}");
            assert_eq!(found(&CreditCardRecognizer, number), [number]);
        }
        // Luhn-valid but no issuer has this range and length: only next to a card word.
        for number in ["1234567812345670", "9999999999999995"] {
            assert!(luhn_valid(&digits(number)));
            assert_eq!(card_issuer(&digits(number)), None, "{number}");
            assert!(scanned(&format!("see {number} now")).is_empty(), "{number}");
            assert_eq!(
                scanned(&format!("my card {number}")),
                [(CREDIT_CARD, number)],
                "{number}"
            );
        }
        // A Visa prefix at a length Visa does not issue, a Mastercard prefix just past the
        // range: neither Luhn-valid, so never found.
        for number in ["41111111111111", "2721000000000005"] {
            assert!(found(&CreditCardRecognizer, number).is_empty(), "{number}");
            assert!(scanned(&format!("card {number}")).is_empty(), "{number}");
        }
    }

    #[test]
    fn older_jcb_diners_maestro_mir_and_rupay_ranges_are_known() {
        for (body, issuer) in [
            // 15-digit JCB (1800, 2131), 14-digit Diners 38/39.
            ("18001234567890", "jcb"),
            ("21311234567890", "jcb"),
            ("3812345678901", "diners"),
            ("3912345678901", "diners"),
            // Maestro 13-19 digits (50, 56-69), Mir, Troy, RuPay.
            ("501812345678901", "maestro"),
            ("676112345678901", "maestro"),
            ("220012345678901", "mir"),
            ("979212345678901", "troy"),
            ("508112345678901", "rupay"),
        ] {
            let card = with_check_digit(&digits(body));
            assert_eq!(card_issuer(&card), Some(issuer), "{body}");
            let text = render(&card, None, 1);
            assert_eq!(found(&CreditCardRecognizer, &text), [text.as_str()]);
            assert_eq!(
                scanned(&format!("number {text}")),
                [(CREDIT_CARD, text.as_str())]
            );
        }
        // The same prefixes at another length, or failing Luhn, are not cards of the range.
        let mut jcb16 = with_check_digit(&digits("180012345678901"));
        assert_eq!(card_issuer(&jcb16), None);
        if let Some(last) = jcb16.last_mut() {
            *last = (*last + 1) % 10;
        }
        assert!(found(&CreditCardRecognizer, &render(&jcb16, None, 1)).is_empty());
    }

    #[test]
    fn twelve_digit_maestro_numbers_need_a_card_word() {
        let card = render(&with_check_digit(&digits("67591234567")), None, 1);
        assert_eq!(card.len(), 12);
        assert_eq!(
            scanned(&format!("lost my card {card} today")),
            [(CREDIT_CARD, card.as_str())]
        );
        assert!(scanned(&format!("code {card} today")).is_empty());
        // Glued to letters: an identifier.
        assert!(scanned(&format!("card U{card} today")).is_empty());
        assert!(scanned("my driver's licence is U62928788557186").is_empty());
        // Near-miss: 12 digits in no Maestro range, even next to "card".
        let other = render(&with_check_digit(&digits("41234567890")), None, 1);
        assert!(scanned(&format!("card {other}")).is_empty());
    }

    #[test]
    fn a_luhn_failing_sixteen_digit_number_is_never_a_card_even_next_to_card_words() {
        for text in [
            "order 4111111111111112",
            "card 4111111111111112",
            "card 3598899323053411",
            "credit card 1234567812345678",
        ] {
            assert!(scanned(text).is_empty(), "{text}");
        }
    }

    #[test]
    fn cards_in_common_and_evasive_formats_are_found() {
        let r = CreditCardRecognizer;
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
        // Spaced out, double separators, dots, followed by a CVV.
        assert_eq!(
            found(&r, "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"),
            ["4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"]
        );
        assert_eq!(
            found(&r, "4111  1111  1111  1111"),
            ["4111  1111  1111  1111"]
        );
        assert_eq!(found(&r, "4111.1111.1111.1111"), ["4111.1111.1111.1111"]);
        assert_eq!(
            found(&r, "4111 1111 1111 1111 123"),
            ["4111 1111 1111 1111"]
        );
    }

    #[test]
    fn non_cards_are_not_found() {
        let r = CreditCardRecognizer;
        // A 16-digit order number that fails Luhn.
        assert!(found(&r, "order 4111111111111112").is_empty());
        // Too short / too long (both Luhn-valid).
        assert!(found(&r, "79927398713").is_empty());
        assert!(found(&r, "41111111111111111111113").is_empty());
        // A valid card embedded in a longer number is not a card.
        assert!(found(&r, "94111111111111111").is_empty());
    }

    #[test]
    fn negative_context_lowers_a_card_below_the_threshold() {
        assert_eq!(
            scanned("card 4111111111111111"),
            [(CREDIT_CARD, "4111111111111111")]
        );
        assert!(scanned("order number 4111111111111111").is_empty());
        assert!(scanned("invoice 4111-1111-1111-1111 attached").is_empty());
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
    fn ssn_rules() {
        assert!(ssn_valid(&digits("078051121")));
        assert!(ssn_valid(&digits("536225436")));
        for bad in [
            "000123456",
            "666123456",
            "900123456",
            "999123456",
            "536003456",
            "536220000",
            "078051120",
            "219099999",
            "123456789",
            "111111111",
            "12345678",
        ] {
            assert!(!ssn_valid(&digits(bad)), "{bad}");
        }
    }

    #[test]
    fn ssns_need_shape_or_context() {
        assert_eq!(
            scanned("SSN 536-22-5436 on file"),
            [(US_SSN, "536-22-5436")]
        );
        assert_eq!(scanned("id 536-22-5436"), [(US_SSN, "536-22-5436")]);
        // Bare 9 digits: only with a context word.
        assert!(scanned("code 536225436").is_empty());
        assert_eq!(scanned("my ssn is 536225436"), [(US_SSN, "536225436")]);
        assert_eq!(
            scanned("social security: 5 3 6 2 2 5 4 3 6"),
            [(US_SSN, "5 3 6 2 2 5 4 3 6")]
        );
        // Forbidden ranges never match, whatever the context.
        for bad in [
            "ssn 666-22-5436",
            "ssn 900-22-5436",
            "ssn 536-00-5436",
            "ssn 536-22-0000",
            "ssn 078-05-1120",
        ] {
            assert!(scanned(bad).is_empty(), "{bad}");
        }
        // Part of a longer token.
        assert!(found(&SsnRecognizer, "x536-22-5436").is_empty());
    }

    #[test]
    fn phones_are_parsed_and_validated() {
        let r = phone();
        assert_eq!(found(&r, "call +1 202-555-0123 now"), ["+1 202-555-0123"]);
        assert_eq!(found(&r, "ring +44 20 7946 0958."), ["+44 20 7946 0958"]);
        assert_eq!(found(&r, "ruf an: +49 30 901820"), ["+49 30 901820"]);
        assert_eq!(found(&r, "0049 30 901820"), ["0049 30 901820"]);
        assert_eq!(found(&r, "(202) 555-0123"), ["(202) 555-0123"]);
        assert_eq!(found(&r, "020 7946 0958"), ["020 7946 0958"]);
        assert_eq!(
            found(&r, "202-555-0123 or 212.555.0199"),
            ["202-555-0123", "212.555.0199"]
        );
        // A card (more than 15 digits) is never tried as a phone number.
        assert!(found(&r, "4111 1111 1111 1111").is_empty());
        assert_eq!(scanned("phone: 2025550123"), [(PHONE_NUMBER, "2025550123")]);
    }

    #[test]
    fn extensions_belong_to_the_number() {
        let r = phone();
        for (text, number) in [
            ("desk: 202-555-0123x4587.", "202-555-0123x4587"),
            ("desk: +1-202-555-0123x765 or", "+1-202-555-0123x765"),
            ("desk: (202) 555-0123 ext. 12", "(202) 555-0123 ext. 12"),
            ("desk: 202.555.0123 #99", "202.555.0123 #99"),
        ] {
            assert_eq!(found(&r, text), [number], "{text}");
        }
        // Not an extension: letters go on, or the number before is not valid.
        assert!(found(&r, "202-555-0123xyz").is_empty());
        assert!(found(&r, "111-111-1111x12").is_empty());
    }

    #[test]
    fn a_valid_international_number_survives_a_lowering_word() {
        for text in [
            " x +44 20 7946 0958 x Id",
            "order id +44 20 7946 0958",
            "ref: 0044 20 7946 0958",
        ] {
            assert_eq!(scanned(text).len(), 1, "{text}: {:?}", scanned(text));
            assert_eq!(scanned(text)[0].0, PHONE_NUMBER, "{text}");
        }
    }

    #[test]
    fn national_numbers_of_other_regions_need_a_context_word() {
        let r = phone();
        // Belgian, Dutch and Australian numbers (regions US and GB configured).
        for number in ["0494 92 82 32", "06-82237745", "(02) 4071 4121"] {
            assert_eq!(
                scanned(&format!("call me at {number} please")),
                [(PHONE_NUMBER, number)],
                "{number}"
            );
            assert_eq!(
                scanned(&format!("Mobile: {number}")),
                [(PHONE_NUMBER, number)],
                "{number}"
            );
            // Without a context word: not even a candidate.
            assert!(
                found(&r, &format!("see {number} below")).is_empty(),
                "{number}"
            );
            // A context word that lowers cancels the raise.
            assert!(
                scanned(&format!("call about account id {number}")).is_empty(),
                "{number}"
            );
        }
        // Valid in no region, even with a context word.
        assert!(scanned("phone: 0000 000").is_empty());
        // A region that is configured does not need the context.
        let be = PhoneRecognizer::new(&[country::Id::BE]).unwrap();
        assert_eq!(found(&be, "see 0494 92 82 32 below"), ["0494 92 82 32"]);
    }

    #[test]
    fn escapes_dates_and_times_around_numbers() {
        let r = phone();
        // Text pasted from JSON: a literal `\n` before the number separates it.
        assert_eq!(found(&r, r"Phone:\n202-555-0123\nE-mail"), ["202-555-0123"]);
        assert!(found(&r, "x202-555-0123").is_empty());
        // A timestamp is not a phone number (its date and hour look like one).
        for text in [
            "at 2000-04-16 11:34:35 in",
            "at 2010-12-15 10:31:41.204013, then",
            "phone 1978-04-13 12:20:39",
            "call at 12:30:45",
        ] {
            assert!(found(&r, text).is_empty(), "{text}: {:?}", found(&r, text));
        }
    }

    #[test]
    fn non_phones_are_not_found() {
        let r = phone();
        for text in [
            "+1 111-111-1111",
            "+99 1234 5678",
            "123-4567",
            "2024-01-31",
            "31/01/2024",
            "10.20.30.40",
            "v1.2.3.4567",
            "+1234",
        ] {
            assert!(found(&r, text).is_empty(), "{text}: {:?}", found(&r, text));
        }
        // Bare digits without context stay below the threshold.
        assert!(scanned("ticket 2025550123").is_empty());
    }

    #[test]
    fn ibans_are_checked() {
        let r = IbanRecognizer::new().unwrap();
        assert!(iban_valid("DE89370400440532013000"));
        assert!(iban_valid("GB82WEST12345698765432"));
        assert!(iban_valid("gb82west12345698765432"));
        assert_eq!(
            found(&r, "IBAN DE89 3704 0044 0532 0130 00, thanks"),
            ["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            found(&r, "to GB82WEST12345698765432."),
            ["GB82WEST12345698765432"]
        );
        assert_eq!(
            found(&r, "NL91-ABNA-0417-1643-00"),
            ["NL91-ABNA-0417-1643-00"]
        );
        // Wrong check digits, wrong length for the country, unknown country, part of a word.
        for text in [
            "DE88 3704 0044 0532 0130 00",
            "DE89 3704 0044 0532 0130 001",
            "DE89370400440532013",
            "ZZ89370400440532013000",
            "XDE89370400440532013000",
        ] {
            assert!(found(&r, text).is_empty(), "{text}");
        }
    }

    #[test]
    fn ip_addresses_are_parsed() {
        let r = IpRecognizer::new().unwrap();
        assert_eq!(
            found(&r, "from 192.168.1.20, and 8.8.8.8."),
            ["192.168.1.20", "8.8.8.8"]
        );
        assert_eq!(
            found(&r, "host 2001:db8::8a2e:370:7334 and fe80::1"),
            ["2001:db8::8a2e:370:7334", "fe80::1"]
        );
        // The IPv4 inside is part of the IPv6 address.
        assert_eq!(
            scanned("[::ffff:10.0.0.1]:443"),
            [(IP_ADDRESS, "::ffff:10.0.0.1")]
        );
        for text in [
            "version 1.2.3.4.5",
            "256.1.1.1",
            "01.02.03.04",
            "v1.2.3.4",
            "1.2.3",
            "std::vec::Vec",
            "at 12:30:45",
            "a::b",
            "1.2.3.4.",
        ] {
            let hits = found(&r, text);
            assert!(hits.is_empty() || text == "1.2.3.4.", "{text}: {hits:?}");
        }
        // Loopback is found but below the threshold; "version" lowers.
        assert!(scanned("on 127.0.0.1").is_empty());
        assert!(scanned("version 10.2.0.1").is_empty());
        assert_eq!(scanned("server at 10.2.0.1"), [(IP_ADDRESS, "10.2.0.1")]);
    }

    #[test]
    fn url_credentials_are_found() {
        let r = UrlCredentialsRecognizer::new().unwrap();
        assert_eq!(
            found(
                &r,
                "DATABASE_URL=postgres://admin:s3cr3t!@db.internal:5432/app"
            ),
            ["admin:s3cr3t!"]
        );
        assert_eq!(found(&r, "https://u:p@example.com"), ["u:p"]);
        for text in [
            "https://example.com/a@b",
            "mailto:jane@example.com",
            "https://user@example.com",
            "ssh://git@github.com:org/repo",
        ] {
            assert!(found(&r, text).is_empty(), "{text}");
        }
    }

    fn visa_digits() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![Just(12usize), Just(15), Just(18)]
            .prop_flat_map(|len| proptest::collection::vec(0u8..10, len))
            .prop_map(|mut body| {
                body[0] = 4;
                with_check_digit(&body)
            })
    }
    fn separator() -> impl Strategy<Value = (Option<char>, usize)> {
        (
            prop_oneof![Just(None), Just(Some(' ')), Just(Some('-'))],
            3usize..=6,
        )
    }
    /// Text with no ASCII digit, `@` or context word, so it contains no entity of its own.
    fn plain_text() -> impl Strategy<Value = String> {
        "[^0-9@:a-z]{0,40}"
    }

    proptest! {
        #[test]
        fn valid_cards_are_found_in_arbitrary_text(
            digits in visa_digits(), (sep, group) in separator(), prefix in "\\PC{0,40}", suffix in "\\PC{0,40}",
        ) {
            let card_text = render(&digits, sep, group);
            let text = format!("{prefix} card {card_text}. {suffix}");
            let start = prefix.len() + " card ".len();
            let card_range = start..start + card_text.len();
            let mut out = Vec::new();
            CreditCardRecognizer.find(&Input::new(&text), &mut out);
            prop_assert!(
                out.iter().any(|c| c.range.start <= card_range.start && card_range.end <= c.range.end),
                "card {card_text:?} not found in {text:?}: {out:?}"
            );
        }

        #[test]
        fn luhn_failing_numbers_are_not_found(
            body in visa_digits(), bump in 1u8..10, (sep, group) in separator(),
            prefix in plain_text(), suffix in plain_text(),
        ) {
            let mut digits = body;
            if let Some(last) = digits.last_mut() {
                *last = (*last + bump) % 10;
            }
            prop_assert!(!luhn_valid(&digits));
            let number = render(&digits, sep, group);
            let text = format!("{prefix} {number} {suffix}");
            // Never as a whole (a shorter window of whole groups may be a card of its own).
            prop_assert!(!found(&CreditCardRecognizer, &text).contains(&number.as_str()), "{text:?}");
            if sep.is_none() {
                prop_assert!(found(&CreditCardRecognizer, &text).is_empty(), "{text:?}");
            }
        }

        #[test]
        fn random_digit_strings_are_found_exactly_when_valid(digits in proptest::collection::vec(0u8..10, 1..30)) {
            let text = render(&digits, None, 1);
            let expected = card_score(&digits).is_some();
            prop_assert_eq!(!found(&CreditCardRecognizer, &text).is_empty(), expected);
        }

        #[test]
        fn ibans_with_a_changed_character_are_not_found(i in 0usize..22, bump in 1u8..10) {
            let mut iban = b"DE89370400440532013000".to_vec();
            if iban[i].is_ascii_digit() {
                iban[i] = b'0' + (iban[i] - b'0' + bump) % 10;
                // A single changed digit always changes the remainder mod 97.
                prop_assert!(!iban_valid(std::str::from_utf8(&iban).unwrap()));
            }
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
            prop_assert!(found(&email(), &text).is_empty());
        }

        #[test]
        fn recognisers_never_panic_on_arbitrary_text(text in "\\PC{0,120}") {
            let _ = scanned(&text);
        }
    }
}
