//! Normalisation against evasion, applied before detection.
//!
//! The recognisers run on a *view* of the text in which
//! - every character is in Unicode NFKC (fullwidth `４１１１`, mathematical `𝟒`, ligatures, `＠`),
//! - invisible characters are removed (zero-width space/joiners, soft hyphen, bidi controls,
//!   variation selectors, tag characters) and so are combining marks that do not compose,
//! - Cyrillic and Greek look-alikes of Latin letters are folded (`ехаmple` → `example`), decimal
//!   digits of other scripts become ASCII digits (`٤١١١` → `4111`), and dash, dot and space
//!   variants become `-`, `.` and ` `.
//!
//! Every byte of the view remembers the byte span of the original text it came from, so a match
//! in the view is mapped back to the original with [`Normalized::to_original`] and redaction edits
//! the original text. Spaced-out and separated digits are joined by the number recognisers
//! themselves (see `recognizer::digit_runs`), so their spans cover the separators.
//!
//! Pure ASCII text is its own view: no allocation.

use std::{borrow::Cow, ops::Range};

use unicode_normalization::{
    IsNormalized, UnicodeNormalization, char::canonical_combining_class, is_nfkc_quick,
};

/// A text's detection view and the way back to the original.
#[derive(Debug)]
pub struct Normalized<'a> {
    text: Cow<'a, str>,
    /// For every byte of `text`: the byte span of the original it came from. Empty: identity.
    spans: Vec<(usize, usize)>,
}

impl<'a> Normalized<'a> {
    /// Normalises `original`.
    pub fn new(original: &'a str) -> Self {
        if original.is_ascii() {
            return Normalized {
                text: Cow::Borrowed(original),
                spans: Vec::new(),
            };
        }
        let mut text = String::with_capacity(original.len());
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(original.len());
        let mut chars = original.char_indices().peekable();
        let mut segment = String::new();
        while let Some((start, c)) = chars.next() {
            // A segment: one character and the combining marks that follow it.
            let mut end = start + c.len_utf8();
            segment.clear();
            segment.push(c);
            while let Some(&(at, next)) = chars.peek() {
                if canonical_combining_class(next) == 0 {
                    break;
                }
                segment.push(next);
                end = at + next.len_utf8();
                chars.next();
            }
            let mut push = |folded: char| {
                let before = text.len();
                text.push(folded);
                spans.extend(std::iter::repeat_n((start, end), text.len() - before));
            };
            if segment.len() == 1 {
                // ASCII: as it is.
                push(c);
                continue;
            }
            if end - start == c.len_utf8() && is_nfkc_quick(std::iter::once(c)) == IsNormalized::Yes
            {
                // One character, already in NFKC: only folded.
                if !is_invisible(c) {
                    push(fold(c));
                }
                continue;
            }
            for n in segment.nfkc() {
                if is_invisible(n) || canonical_combining_class(n) != 0 {
                    continue;
                }
                push(fold(n));
            }
        }
        Normalized {
            text: Cow::Owned(text),
            spans,
        }
    }

    /// The detection view.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The original byte range of `range` (a range of the view, on character boundaries).
    pub fn to_original(&self, range: Range<usize>) -> Range<usize> {
        if self.spans.is_empty() {
            return range;
        }
        let start = self
            .spans
            .get(range.start)
            .map_or_else(|| self.original_end(), |s| s.0);
        if range.is_empty() {
            return start..start;
        }
        let end = self
            .spans
            .get(range.end - 1)
            .map_or_else(|| self.original_end(), |s| s.1);
        start..end.max(start)
    }

    fn original_end(&self) -> usize {
        self.spans.last().map_or(0, |s| s.1)
    }
}

/// Characters that render as nothing (or nearly) and are used to split words and numbers.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}' | '\u{FFA0}' | '\u{E0000}'..='\u{E007F}' | '\u{E0100}'..='\u{E01EF}')
}

/// First code points of the decimal digit blocks (0..=9 in order) of other scripts.
const DIGIT_ZEROS: &[u32] = &[
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0,
];

/// Folds a look-alike to the ASCII character it imitates; other characters are returned as they are.
fn fold(c: char) -> char {
    if c.is_ascii() {
        return c;
    }
    let code = u32::from(c);
    for &zero in DIGIT_ZEROS {
        if (zero..zero + 10).contains(&code)
            && let Some(digit) = char::from_digit(code - zero, 10)
        {
            return digit;
        }
    }
    match c {
        // Cyrillic capitals and small letters.
        'А' => 'A',
        'В' => 'B',
        'С' => 'C',
        'Е' => 'E',
        'Н' => 'H',
        'І' => 'I',
        'Ј' => 'J',
        'К' => 'K',
        'М' => 'M',
        'О' => 'O',
        'Р' => 'P',
        'Ѕ' => 'S',
        'Т' => 'T',
        'Х' => 'X',
        'У' | 'Ү' => 'Y',
        'Ԁ' => 'D',
        'Ԛ' => 'Q',
        'Ԝ' => 'W',
        'а' => 'a',
        'с' => 'c',
        'ԁ' => 'd',
        'е' => 'e',
        'һ' => 'h',
        'і' => 'i',
        'ј' => 'j',
        'ӏ' => 'l',
        'о' => 'o',
        'р' => 'p',
        'ԛ' => 'q',
        'ѕ' => 's',
        'ԝ' => 'w',
        'х' => 'x',
        'у' | 'ү' => 'y',
        // Greek capitals and small letters.
        'Α' => 'A',
        'Β' => 'B',
        'Ε' => 'E',
        'Ζ' => 'Z',
        'Η' => 'H',
        'Ι' => 'I',
        'Κ' => 'K',
        'Μ' => 'M',
        'Ν' => 'N',
        'Ο' => 'O',
        'Ρ' => 'P',
        'Τ' => 'T',
        'Υ' => 'Y',
        'Χ' => 'X',
        'α' => 'a',
        'ι' => 'i',
        'κ' => 'k',
        'ν' => 'v',
        'ο' => 'o',
        'ρ' => 'p',
        'υ' => 'u',
        'χ' => 'x',
        // Other Latin look-alikes.
        'ı' => 'i',
        'ȷ' => 'j',
        'ɑ' => 'a',
        'ɡ' => 'g',
        // Punctuation variants.
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}' => '-',
        '\u{3002}' | '\u{FF61}' | '\u{2024}' | '\u{00B7}' => '.',
        '\u{00A0}' | '\u{2000}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}' => ' ',
        _ => c,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(text: &str) -> String {
        Normalized::new(text).text().to_owned()
    }

    #[test]
    fn ascii_is_its_own_view() {
        let n = Normalized::new("jane@example.com 4111");
        assert!(matches!(n.text, Cow::Borrowed(_)));
        assert_eq!(n.to_original(5..16), 5..16);
    }

    #[test]
    fn evasions_are_undone() {
        // Fullwidth digits and at sign, mathematical digits.
        assert_eq!(view("４１１１ ＠ 𝟒𝟏"), "4111 @ 41");
        // Zero-width characters and soft hyphens.
        assert_eq!(view("ja\u{200B}ne@exa\u{00AD}mple.com"), "jane@example.com");
        assert_eq!(view("41\u{2060}11\u{FEFF}"), "4111");
        // Cyrillic and Greek look-alikes.
        assert_eq!(view("jаnе@ехаmрlе.соm"), "jane@example.com");
        assert_eq!(view("ΑΚΙΑ"), "AKIA");
        // Digits of other scripts.
        assert_eq!(view("٤١١١ ४१११"), "4111 4111");
        // Combining marks that do not compose are dropped; composed letters stay.
        assert_eq!(view("j\u{0336}ane"), "jane");
        assert_eq!(view("e\u{0301}"), "\u{e9}");
        // Dash and space variants.
        assert_eq!(view("4111\u{2013}1111\u{00A0}1111"), "4111-1111 1111");
    }

    #[test]
    fn view_ranges_map_back_to_the_original() {
        let original = "mail: jаnе\u{200B}@exam\u{00AD}ple.com!";
        let n = Normalized::new(original);
        let at = n.text().find("jane@example.com").unwrap();
        let range = n.to_original(at..at + "jane@example.com".len());
        assert_eq!(&original[range], "jаnе\u{200B}@exam\u{00AD}ple.com");
        let n = Normalized::new("ﬁ ４");
        assert_eq!(n.text(), "fi 4");
        assert_eq!(n.to_original(0..1), 0..3);
        assert_eq!(n.to_original(1..2), 0..3);
        assert_eq!(n.to_original(3..4), 4..7);
        assert_eq!(n.to_original(4..4), 7..7);
    }

    proptest! {
        #[test]
        fn every_view_range_maps_to_char_boundaries(text in "\\PC{0,60}", a in 0usize..200, b in 0usize..200) {
            let n = Normalized::new(&text);
            let view = n.text();
            let (mut a, mut b) = (a.min(view.len()), b.min(view.len()));
            if a > b { std::mem::swap(&mut a, &mut b); }
            while !view.is_char_boundary(a) { a -= 1; }
            while !view.is_char_boundary(b) { b += 1; }
            let range = n.to_original(a..b);
            prop_assert!(range.start <= range.end && range.end <= text.len());
            prop_assert!(text.is_char_boundary(range.start) && text.is_char_boundary(range.end));
        }
    }
}
