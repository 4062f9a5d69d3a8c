//! Names, street addresses and locations, as far as dictionaries and rules get without a model:
//!
//! - `PERSON`: capitalised words in a list of given names (`data/first_names.txt`) or family
//!   names (`data/surnames.txt`), joined with the capitalised words and initials next to them,
//!   and any capitalised word run after a title (`Mr`, `Dr`, …) or a cue (`my name is`, `Dear`,
//!   `signed`, …). Names outside the lists, lower-cased names and names at the start of a
//!   sentence that are also common words are missed or scored low.
//! - `STREET_ADDRESS`: a house number, up to five words and a street suffix (`Street`, `Ave`,
//!   `Road`, …) with an optional unit, city, state and ZIP; continental forms
//!   (`Hauptstraße 5`, `Rue de la Paix 12`, `Via Roma 3`); unit numbers (`Apt. 5`, `Suite 300`)
//!   and US military addresses (`PSC 1234, Box 5678`).
//! - `LOCATION`: a gazetteer of countries, US states, a few regions and large cities
//!   (`data/places.txt`), matched capitalised and as whole words.
//!
//! The lists were written for this project (no third-party data). The measured recall on the
//! development set is in `docs/GUARD.md`: well below the checksum-validated recognisers.

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::Regex;

use super::{Candidate, Context, Input, LOCATION, PERSON, Recognizer, STREET_ADDRESS};

const FIRST_NAMES: &str = include_str!("data/first_names.txt");
const SURNAMES: &str = include_str!("data/surnames.txt");
const PLACES: &str = include_str!("data/places.txt");

/// Titles before a name (without the dot).
const TITLES: &[&str] = &[
    "Mr",
    "Mrs",
    "Ms",
    "Miss",
    "Mx",
    "Dr",
    "Prof",
    "Professor",
    "Sir",
    "Dame",
    "Madam",
    "Lord",
    "Lady",
    "Herr",
    "Frau",
    "Mme",
    "Mlle",
    "Monsieur",
    "Madame",
    "Señor",
    "Señora",
    "Sr",
    "Sra",
];

/// Lower-cased phrases right before a name that make it one.
const STRONG_CUES: &[&str] = &[
    "my name is",
    "name is",
    "name:",
    "named",
    "called",
    "i am",
    "i'm",
    "this is",
    "dear",
    "regards,",
    "sincerely,",
    "signed",
    "user:",
    "customer:",
    "patient:",
];

/// Lower-cased words right before a name that make it a bit more likely.
const WEAK_CUES: &[&str] = &[
    "hi", "hello", "thanks", "ask", "by", "with", "from", "contact", "patient", "customer",
    "employee", "mr.", "mrs.", "ms.", "dr.", "and", "to", "for",
];

/// Given names that are also common capitalised words at the start of a sentence.
const COMMON_WORD_NAMES: &[&str] = &[
    "will", "may", "mark", "bill", "grace", "hope", "faith", "rose", "june", "april", "joy",
    "dawn", "max", "sam", "jack", "art", "guy", "pat", "ray", "rich", "sky", "summer", "lily",
    "ruby", "jean", "long", "young", "king", "bell", "wood", "green", "white", "brown", "hill",
    "gray", "price", "ward", "cook", "baker", "ford", "wolf", "park", "lee", "li", "kim", "bo",
    "per", "ole", "ask", "an", "jan", "chen",
];

/// Capitalised words that never start or continue a name.
const NOT_NAMES: &[&str] = &[
    "The",
    "A",
    "An",
    "I",
    "We",
    "You",
    "He",
    "She",
    "They",
    "It",
    "My",
    "Our",
    "Your",
    "His",
    "Her",
    "Their",
    "This",
    "That",
    "These",
    "Those",
    "And",
    "Or",
    "But",
    "If",
    "In",
    "On",
    "At",
    "To",
    "For",
    "Of",
    "From",
    "With",
    "By",
    "As",
    "Is",
    "Are",
    "Was",
    "Were",
    "Be",
    "Please",
    "Thanks",
    "Thank",
    "Hi",
    "Hello",
    "Dear",
    "Yes",
    "No",
    "Not",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Street",
    "Road",
    "Avenue",
    "Inc",
    "Ltd",
    "LLC",
    "Corp",
    "Company",
    "University",
    "Bank",
    "Hospital",
    "School",
    "Bot",
    "User",
    "Assistant",
    "System",
    "What",
    "When",
    "Where",
    "Who",
    "Why",
    "How",
    "Can",
    "Could",
    "Would",
    "Should",
    "Do",
    "Does",
    "Did",
    "Have",
    "Has",
    "Had",
    "All",
    "Some",
    "Any",
    "Each",
    "Every",
    "New",
    "Old",
    "North",
    "South",
    "East",
    "West",
    "Mr",
    "Mrs",
    "Ms",
    "Dr",
    "I'm",
    "I'll",
    "I've",
    "I'd",
    "Today",
    "Tomorrow",
    "Yesterday",
    "Here",
    "There",
    "Then",
    "Now",
    "Also",
    "Just",
    "Sure",
    "Ok",
    "Okay",
    "Let",
    "Let's",
    "Maybe",
    "Dear",
];

/// One word of the text.
#[derive(Debug, Clone, Copy)]
struct Word<'a> {
    start: usize,
    end: usize,
    text: &'a str,
}

/// The words of `text`: letters with inner apostrophes and hyphens (`O'Neil`, `Jean-Luc`).
fn words(text: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let inner = (c == '\'' || c == '-' || c == '’')
            && start.is_some()
            && chars.peek().is_some_and(|(_, n)| n.is_alphabetic());
        if c.is_alphabetic() || inner {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            out.push(Word {
                start: s,
                end: i,
                text: &text[s..i],
            });
        }
    }
    if let Some(s) = start {
        out.push(Word {
            start: s,
            end: text.len(),
            text: &text[s..],
        });
    }
    out
}

/// `Jane`, `O'Neil`, `Šárka`: an upper-case letter, then at least one letter, not all capitals.
fn capitalised(word: &str) -> bool {
    let mut chars = word.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    first.is_uppercase() && word.chars().skip(1).any(char::is_lowercase)
}

/// People's names.
pub struct PersonRecognizer {
    first: HashSet<String>,
    last: HashSet<String>,
}

static PERSON_CONTEXT: Context = Context {
    raise: &[
        "name",
        "mr",
        "mrs",
        "ms",
        "dr",
        "dear",
        "sincerely",
        "regards",
        "signed",
        "customer",
        "patient",
        "employee",
        "contact",
        "author",
        "manager",
        "director",
    ],
    lower: &[],
    boost: 0.15,
    penalty: 0.0,
};

fn word_list(text: &str) -> HashSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(str::split_whitespace)
        .map(str::to_lowercase)
        .collect()
}

impl PersonRecognizer {
    /// Loads the name lists.
    pub fn new() -> Self {
        PersonRecognizer {
            first: word_list(FIRST_NAMES),
            last: word_list(SURNAMES),
        }
    }

    fn known(&self, word: &str) -> bool {
        let lower = word.to_lowercase();
        self.first.contains(&lower) || self.last.contains(&lower)
    }

    fn score(&self, text: &str, run: &[Word<'_>], at_sentence_start: bool) -> f32 {
        let lower: Vec<String> = run.iter().map(|w| w.text.to_lowercase()).collect();
        let first = self.first.contains(&lower[0]);
        let last = lower.len() >= 2 && lower.last().is_some_and(|w| self.last.contains(w));
        let any_known = lower
            .iter()
            .any(|w| self.first.contains(w) || self.last.contains(w));
        let before = text[..run[0].start].trim_end();
        let before_lower = before.to_lowercase();
        let titled = before
            .trim_end_matches('.')
            .rsplit(|c: char| !c.is_alphabetic())
            .next()
            .is_some_and(|w| TITLES.contains(&w));
        let ends_with_cue = |cues: &[&str]| {
            cues.iter().any(|cue| {
                before_lower.ends_with(cue)
                    && before_lower[..before_lower.len() - cue.len()]
                        .chars()
                        .next_back()
                        .is_none_or(|c| !c.is_alphanumeric())
            })
        };
        let ambiguous =
            run.len() == 1 && at_sentence_start && COMMON_WORD_NAMES.contains(&lower[0].as_str());
        let mut score: f32 = match (run.len(), first, last) {
            (1, true, _) => 0.6,
            (1, false, _) if any_known => 0.45,
            (1, false, _) => 0.2,
            (_, true, true) => 0.9,
            (_, true, false) => 0.8,
            (_, false, true) => 0.7,
            (_, false, false) if any_known => 0.45,
            _ => 0.25,
        };
        if titled {
            score = score.max(0.85);
        } else if ends_with_cue(STRONG_CUES) {
            score = (score + 0.35).min(0.9);
        } else if ends_with_cue(WEAK_CUES) {
            score = (score + 0.2).min(0.9);
        } else if ambiguous {
            score = 0.3;
        }
        score
    }
}

impl Default for PersonRecognizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Recognizer for PersonRecognizer {
    fn entity_type(&self) -> &'static str {
        PERSON
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let words = words(text);
        let mut i = 0;
        while i < words.len() {
            let w = words[i];
            if !capitalised(w.text) || NOT_NAMES.contains(&w.text) || TITLES.contains(&w.text) {
                i += 1;
                continue;
            }
            // A run: capitalised words separated by one space, or by an initial (`Jane Q. Doe`).
            let mut run = vec![w];
            let mut j = i + 1;
            while j < words.len() && run.len() < 4 {
                let gap = &text[run[run.len() - 1].end..words[j].start];
                let next = words[j];
                let initial = next.text.chars().count() == 1
                    && next.text.chars().all(char::is_uppercase)
                    && text[next.end..].starts_with(". ");
                if gap == " " && initial {
                    run.push(Word {
                        end: next.end + 1,
                        ..next
                    });
                    j += 1;
                    continue;
                }
                let joined = gap == " " || (gap == ". " && run[run.len() - 1].text.len() == 1);
                if !joined || !capitalised(next.text) || NOT_NAMES.contains(&next.text) {
                    break;
                }
                run.push(next);
                j += 1;
            }
            // An initial cannot end a name.
            while run.len() > 1 && run[run.len() - 1].text.chars().count() == 1 {
                run.pop();
            }
            let before = text[..w.start].trim_end();
            let at_sentence_start = before.is_empty()
                || before.ends_with(['.', '!', '?', '\n', ':', '"'])
                || text[..w.start].ends_with('\n');
            // A capitalised word that only starts the sentence is not part of the name after it.
            if at_sentence_start
                && run.len() >= 2
                && !self.known(run[0].text)
                && self.known(run[1].text)
            {
                i += 1;
                continue;
            }
            let score = self.score(text, &run, at_sentence_start);
            out.push(Candidate {
                range: run[0].start..run[run.len() - 1].end,
                score,
            });
            i += run.len().max(1);
        }
    }

    fn context(&self) -> &Context {
        &PERSON_CONTEXT
    }
}

/// Street addresses.
pub struct AddressRecognizer {
    patterns: Vec<(Regex, f32)>,
}

const STREET_SUFFIXES: &str = r"Street|St|Avenue|Ave|Av|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|Way|Parkway|Pkwy|Circle|Cir|Highway|Hwy|Square|Sq|Trail|Trl|Plaza|Alley|Crescent|Cres|Close|Row|Loop|Path|Pike|Run|Gardens|Grove|Heights|Hollow|Mews|Walk|Wynd|Estates|Junction|Landing|Manor|Meadows|Ridge|Springs|Station|View|Villas|Crossing|Point|Harbor|Harbour|Park";

impl AddressRecognizer {
    /// Compiles the patterns.
    pub fn new() -> Result<Self, regex::Error> {
        let unit = r"(?:,?\s+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Floor|Fl\.?|#)\s*[A-Za-z0-9-]{1,6})?";
        let city = r"(?:,\s*\p{Lu}[\p{L}'.-]*(?:\s+\p{Lu}[\p{L}'.-]*){0,3}(?:,\s*[A-Z]{2})?(?:\s+\d{5}(?:-\d{4})?)?)?";
        let us = format!(
            r"\b\d{{1,6}}[A-Za-z]?\s+(?:[NSEW]\.?\s+|(?:North|South|East|West)\s+)?(?:[\p{{Lu}}0-9][\p{{L}}0-9'.-]*\s+){{1,4}}(?:{STREET_SUFFIXES})\b\.?{unit}{city}"
        );
        let continental_suffix = r"\b\p{Lu}[\p{L}-]*(?:straße|strasse|str\.|gasse|weg|allee|platz|ring|damm|vej|gade|gatan|gata|vägen|väg|veien|vegen|gate|katu|tie|kuja|laan|straat|gracht|plein|steeg|utca|ulica|cesta)\s+\d{1,5}[a-zA-Z]?\b";
        let continental_prefix = r"\b(?:Rue|Avenue|Boulevard|Bd|Chemin|Place|Via|Viale|Piazza|Corso|Calle|Avenida|Av\.|Paseo|Plaza|Carrer|Rua|Travessa|Largo|Ulica|ul\.|Strada|Str\.)\s+(?:[\p{L}'.-]+\s+){0,4}?\d{1,5}[a-zA-Z]?\b";
        let unit_only = r"\b(?:Apt\.?|Apartment|Suite|Ste\.)\s*#?\d{1,5}[A-Za-z]?\b";
        let military = r"\b(?:PSC|Unit|USNS|USNV|USS|USCGC)\s+[\p{L}\d]+(?:\s+[\p{L}\d]+)?,?\s*(?:Box\s+\d{1,5})?\s*\n?\s*(?:APO|FPO|DPO)\s+(?:AA|AE|AP)\s+\d{5}\b";
        let po_box = r"\b(?:P\.?\s?O\.?\s+Box|Post\s+Office\s+Box)\s+\d{1,6}\b";
        Ok(AddressRecognizer {
            patterns: vec![
                (Regex::new(&us)?, 0.75),
                (Regex::new(continental_suffix)?, 0.65),
                (Regex::new(continental_prefix)?, 0.6),
                (Regex::new(military)?, 0.8),
                (Regex::new(po_box)?, 0.7),
                (Regex::new(unit_only)?, 0.55),
            ],
        })
    }
}

static ADDRESS_CONTEXT: Context = Context {
    raise: &[
        "address",
        "lives",
        "live",
        "located",
        "ship",
        "shipping",
        "deliver",
        "delivery",
        "mail",
        "billing",
        "residence",
        "street",
    ],
    lower: &[],
    boost: 0.15,
    penalty: 0.0,
};

impl Recognizer for AddressRecognizer {
    fn entity_type(&self) -> &'static str {
        STREET_ADDRESS
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let has_digit = text.bytes().any(|b| b.is_ascii_digit());
        if !has_digit {
            return;
        }
        for (regex, score) in &self.patterns {
            for m in regex.find_iter(text) {
                let value = m.as_str().trim_end_matches([',', ' ']);
                out.push(Candidate {
                    range: m.start()..m.start() + value.len(),
                    score: *score,
                });
            }
        }
    }

    fn context(&self) -> &Context {
        &ADDRESS_CONTEXT
    }
}

/// Countries, states, regions and large cities.
pub struct LocationRecognizer {
    automaton: AhoCorasick,
}

/// Places that are also common names or words: a lower base score.
const AMBIGUOUS_PLACES: &[&str] = &[
    "Nice",
    "Phoenix",
    "Florence",
    "Sofia",
    "Virginia",
    "Washington",
    "Paris",
    "Sydney",
    "Turkey",
    "Niger",
    "Guinea",
    "Mali",
    "Lima",
    "Santiago",
    "Valencia",
    "Jordan",
    "Georgia",
    "Victoria",
    "Chad",
    "Reading",
    "Bath",
    "Mobile",
    "Split",
    "Wales",
    "Ohio",
    "Alberta",
    "Perth",
    "Graz",
    "Linz",
    "Bern",
    "Oman",
    "Peru",
    "Cuba",
];

static LOCATION_CONTEXT: Context = Context {
    raise: &[
        "in", "from", "to", "at", "near", "visit", "visited", "city", "country", "state", "lives",
        "live", "located", "moved", "born", "capital", "travel", "trip", "flight",
    ],
    lower: &[],
    boost: 0.15,
    penalty: 0.0,
};

impl LocationRecognizer {
    /// Builds the gazetteer.
    pub fn new() -> Result<Self, aho_corasick::BuildError> {
        let places: Vec<&str> = PLACES
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let automaton = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&places)?;
        Ok(LocationRecognizer { automaton })
    }
}

impl Recognizer for LocationRecognizer {
    fn entity_type(&self) -> &'static str {
        LOCATION
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        for m in self.automaton.find_iter(text) {
            let before = text[..m.start()].chars().next_back();
            let after = text[m.end()..].chars().next();
            let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
            if !boundary(before) || !boundary(after) {
                continue;
            }
            let value = &text[m.range()];
            let score = if AMBIGUOUS_PLACES.contains(&value) {
                0.4
            } else {
                0.6
            };
            out.push(Candidate {
                range: m.range(),
                score,
            });
        }
    }

    fn context(&self) -> &Context {
        &LOCATION_CONTEXT
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{found, scanned};
    use super::*;
    use proptest::prelude::*;

    fn persons(text: &str) -> Vec<&str> {
        scanned(text)
            .into_iter()
            .filter(|(e, _)| *e == PERSON)
            .map(|(_, v)| v)
            .collect()
    }

    fn of(entity: &str, text: &str) -> Vec<String> {
        scanned(text)
            .into_iter()
            .filter(|(e, _)| *e == entity)
            .map(|(_, v)| v.to_owned())
            .collect()
    }

    #[test]
    fn names_from_the_lists_titles_and_cues_are_found() {
        assert_eq!(
            persons("Please call Maria Schmidt tomorrow."),
            ["Maria Schmidt"]
        );
        assert_eq!(persons("Ask Dr. Okonkwo about it"), ["Okonkwo"]);
        assert_eq!(persons("My name is Rubija Hadžić."), ["Rubija Hadžić"]);
        assert_eq!(persons("Directed by Johannes Varvio"), ["Johannes Varvio"]);
        assert_eq!(
            persons("the letter from Jane Q. Doe arrived"),
            ["Jane Q. Doe"]
        );
        assert_eq!(persons("Dear Šárka, thanks"), ["Šárka"]);
        assert_eq!(
            persons("contact O'Brien or Jean-Luc Dubois"),
            ["O'Brien", "Jean-Luc Dubois"]
        );
        assert_eq!(persons("Yesterday Maria Rossi called"), ["Maria Rossi"]);
    }

    #[test]
    fn near_misses_are_not_names() {
        for text in [
            "The Quick Brown Fox",
            "Will this work? May I ask?",
            "Monday and Tuesday in March",
            "use the API with JSON over HTTP",
            "mark the box and bill the client",
            "The University Hospital",
            "john smith wrote it in lower case",
        ] {
            assert!(persons(text).is_empty(), "{text}: {:?}", persons(text));
        }
    }

    #[test]
    fn street_addresses_are_found() {
        for (text, address) in [
            (
                "Ship it to 1600 Pennsylvania Avenue NW, please",
                "1600 Pennsylvania Avenue",
            ),
            (
                "I live at 42 W Elm St., Apt 5, Springfield, IL 62704 now",
                "42 W Elm St., Apt 5, Springfield, IL 62704",
            ),
            (
                "Lieferung an Schlösslstrasse 62 bitte",
                "Schlösslstrasse 62",
            ),
            ("chez nous, Rue de la Paix 12", "Rue de la Paix 12"),
            ("see Suite 300 upstairs", "Suite 300"),
            (
                "PSC 7423, Box 3629\nAPO AE 40229",
                "PSC 7423, Box 3629\nAPO AE 40229",
            ),
            ("PO Box 1234", "PO Box 1234"),
        ] {
            assert_eq!(of(STREET_ADDRESS, text), [address], "{text}");
        }
    }

    #[test]
    fn address_near_misses() {
        for text in [
            "I have 3 dogs and 2 cats",
            "version 2 of the road map",
            "Chapter 12 Street Fighting",
            "we sold 500 units",
            "the suite of tests",
        ] {
            assert!(
                of(STREET_ADDRESS, text).is_empty(),
                "{text}: {:?}",
                of(STREET_ADDRESS, text)
            );
        }
    }

    #[test]
    fn locations_from_the_gazetteer() {
        assert_eq!(
            of(LOCATION, "She moved from Tunisia to New York last year."),
            ["Tunisia", "New York"]
        );
        assert_eq!(of(LOCATION, "Flights to São Paulo"), ["São Paulo"]);
        // Whole words, capitalised.
        assert!(of(LOCATION, "Spanish and Germanic; china plates; a nice day").is_empty());
        // Ambiguous places need a location word nearby.
        assert!(of(LOCATION, "Paris Hilton said hi").is_empty());
        assert_eq!(of(LOCATION, "a trip to Paris"), ["Paris"]);
    }

    #[test]
    fn recognisers_report_their_candidates() {
        let person = PersonRecognizer::new();
        assert_eq!(found(&person, "Maria Schmidt"), ["Maria Schmidt"]);
        assert!(found(&person, "lower case only").is_empty());
    }

    proptest! {
        #[test]
        fn listed_first_and_last_names_are_found_in_prose(
            first in proptest::sample::select(vec!["Maria", "Kwame", "Agnieszka", "Mikko", "Priya", "Hans"]),
            last in proptest::sample::select(vec!["Schmidt", "Okafor", "Nowak", "Korhonen", "Patel", "Rossi"]),
            prefix in "[a-z ]{0,20}",
        ) {
            let text = format!("{prefix} yesterday {first} {last} called.");
            let found = persons(&text);
            let expected = format!("{first} {last}");
            prop_assert_eq!(found, vec![expected.as_str()]);
        }

        #[test]
        fn generated_us_street_addresses_are_found(
            number in 1u32..99_999,
            street in proptest::sample::select(vec!["Elm", "Maple Grove", "Martin Luther King", "Oak"]),
            suffix in proptest::sample::select(vec!["Street", "St.", "Avenue", "Ave", "Road", "Blvd", "Lane", "Drive"]),
            prefix in "[a-z ]{0,20}",
        ) {
            let address = format!("{number} {street} {suffix}");
            let text = format!("{prefix} send it to {address} today");
            let found = of(STREET_ADDRESS, &text);
            prop_assert_eq!(found, vec![address.clone()], "{}", text);
        }

        #[test]
        fn numbers_before_lower_case_words_are_not_addresses(number in 1u32..99_999, words in "[a-z]{2,8}( [a-z]{2,8}){0,3}") {
            let text = format!("we counted {number} {words} yesterday");
            prop_assert!(of(STREET_ADDRESS, &text).is_empty(), "{}", text);
        }

        #[test]
        fn lower_case_text_has_no_names_or_places(text in "[a-z ,.]{0,120}") {
            prop_assert!(persons(&text).is_empty());
            prop_assert!(of(LOCATION, &text).is_empty());
        }
    }
}
