//! Rewriting a text: every match whose action transforms is replaced in the ORIGINAL text (view
//! ranges mapped back through [`Normalized::to_original`]).

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    config::MaskConfig,
    normalize::Normalized,
    policy::Action,
    pseudonym::Mapping,
    recognizer::{EMAIL_ADDRESS, Match, canonical},
};

/// How values are rendered; built once at startup.
#[derive(Clone)]
pub struct Renderer {
    mask: MaskConfig,
    /// The keyed HMAC, ready to be cloned per value; `None` when no key is configured.
    hmac: Option<Hmac<Sha256>>,
    hash_length: usize,
}

impl Renderer {
    /// A renderer; `hash_key` is the `hash` action's HMAC key.
    pub fn new(
        mask: MaskConfig,
        hash_key: Option<&[u8]>,
        hash_length: usize,
    ) -> Result<Self, hmac::digest::InvalidLength> {
        let hmac = hash_key
            .map(<Hmac<Sha256> as Mac>::new_from_slice)
            .transpose()?;
        Ok(Renderer {
            mask,
            hmac,
            hash_length,
        })
    }
}

/// The per-request state: pseudonyms are consistent across every text of one request.
pub struct Rewriter<'a> {
    renderer: &'a Renderer,
    /// (entity type, canonical value) → placeholder.
    pseudonyms: HashMap<(&'static str, String), String>,
    counters: HashMap<&'static str, u32>,
    /// Placeholder → original value, returned to the caller.
    pub mapping: Mapping,
    /// Texts of the request: a placeholder already written in one is never issued.
    texts: Vec<&'a str>,
}

impl<'a> Rewriter<'a> {
    /// A rewriter for one request whose texts are `texts`.
    pub fn new(renderer: &'a Renderer, texts: Vec<&'a str>) -> Self {
        Rewriter {
            renderer,
            pseudonyms: HashMap::new(),
            counters: HashMap::new(),
            mapping: Mapping::new(),
            texts,
        }
    }

    /// `original` with every match whose `action_of` transforms replaced. `matches` are ranges
    /// of `view`, sorted and not overlapping.
    pub fn rewrite(
        &mut self,
        original: &str,
        view: &Normalized<'_>,
        matches: &[Match],
        action_of: impl Fn(&'static str) -> Action,
    ) -> String {
        let mut out = String::with_capacity(original.len() + 16 * matches.len());
        let mut at = 0;
        for m in matches {
            let action = action_of(m.entity_type);
            if !action.transforms() {
                continue;
            }
            let range = view.to_original(m.range.clone());
            let start = range.start.max(at);
            if start >= range.end {
                continue;
            }
            out.push_str(&original[at..start]);
            let value = &original[start..range.end];
            let key = canonical(m.entity_type, &view.text()[m.range.clone()]);
            self.render(&mut out, m.entity_type, action, value, &key);
            at = range.end;
        }
        out.push_str(&original[at..]);
        out
    }

    fn render(
        &mut self,
        out: &mut String,
        entity_type: &'static str,
        action: Action,
        value: &str,
        key: &str,
    ) {
        match action {
            Action::Allow | Action::Block | Action::Flag => out.push_str(value),
            Action::Redact => {
                out.push('[');
                out.push_str(entity_type);
                out.push(']');
            }
            Action::Mask => self.mask(out, entity_type, key),
            Action::Hash => {
                out.push('<');
                out.push_str(entity_type);
                out.push(':');
                match &self.renderer.hmac {
                    Some(hmac) => {
                        let mut mac = hmac.clone();
                        mac.update(entity_type.as_bytes());
                        mac.update(b"\0");
                        mac.update(key.as_bytes());
                        let digest = hex::encode(mac.finalize().into_bytes());
                        out.push_str(&digest[..self.renderer.hash_length.min(digest.len())]);
                    }
                    // Configuration validation requires a key for the hash action.
                    None => out.push_str("REDACTED"),
                }
                out.push('>');
            }
            Action::Pseudonymize => {
                let placeholder = match self.pseudonyms.get(&(entity_type, key.to_owned())) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.next_placeholder(entity_type);
                        self.pseudonyms
                            .insert((entity_type, key.to_owned()), p.clone());
                        self.mapping.insert(p.clone(), value.to_owned());
                        p
                    }
                };
                out.push_str(&placeholder);
            }
        }
    }

    fn next_placeholder(&mut self, entity_type: &'static str) -> String {
        let counter = self.counters.entry(entity_type).or_insert(0);
        loop {
            *counter = counter.saturating_add(1);
            let placeholder = format!("<{entity_type}_{counter}>");
            if !self.texts.iter().any(|t| t.contains(&placeholder)) {
                return placeholder;
            }
        }
    }

    fn mask(&self, out: &mut String, entity_type: &'static str, key: &str) {
        let mask = &self.renderer.mask;
        let stars = |out: &mut String| out.extend(std::iter::repeat_n(mask.char, 4));
        if entity_type == EMAIL_ADDRESS {
            match (mask.email_domain, key.split_once('@')) {
                (true, Some((local, domain))) => {
                    if let Some(first) = local.chars().next() {
                        out.push(first);
                    }
                    out.extend(std::iter::repeat_n(mask.char, 3));
                    out.push('@');
                    out.push_str(domain);
                }
                _ => stars(out),
            }
            return;
        }
        stars(out);
        if crate::recognizer::NUMBER_LIKE.contains(&entity_type) && key.len() > mask.keep_last * 2 {
            out.push_str(&key[key.len() - mask.keep_last..]);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::recognizer::{CREDIT_CARD, GITHUB_TOKEN, PHONE_NUMBER, US_SSN};

    fn renderer() -> Renderer {
        Renderer::new(MaskConfig::default(), Some(b"0123456789abcdef"), 8).unwrap()
    }

    fn rewrite(text: &str, found: &[(&'static str, &str)], action: Action) -> (String, Mapping) {
        let renderer = renderer();
        let mut rewriter = Rewriter::new(&renderer, vec![text]);
        let view = Normalized::new(text);
        let matches: Vec<Match> = found
            .iter()
            .map(|(entity_type, value)| {
                let at = view.text().find(value).unwrap();
                Match {
                    entity_type,
                    range: at..at + value.len(),
                    score: 1.0,
                }
            })
            .collect();
        let out = rewriter.rewrite(text, &view, &matches, |_| action);
        (out, rewriter.mapping)
    }

    #[test]
    fn every_action_renders() {
        let text = "mail jane@example.com card 4111 1111 1111 1234 tok ghp_x";
        let found = [
            (EMAIL_ADDRESS, "jane@example.com"),
            (CREDIT_CARD, "4111 1111 1111 1234"),
            (GITHUB_TOKEN, "ghp_x"),
        ];
        assert_eq!(
            rewrite(text, &found, Action::Redact).0,
            "mail [EMAIL_ADDRESS] card [CREDIT_CARD] tok [GITHUB_TOKEN]"
        );
        assert_eq!(
            rewrite(text, &found, Action::Mask).0,
            "mail j***@example.com card ****1234 tok ****"
        );
        let hashed = rewrite(text, &found, Action::Hash).0;
        assert!(hashed.starts_with("mail <EMAIL_ADDRESS:"), "{hashed}");
        assert_eq!(
            hashed.len(),
            "mail <EMAIL_ADDRESS:12345678> card <CREDIT_CARD:12345678> tok <GITHUB_TOKEN:12345678>"
                .len()
        );
        // Keyed hashes are stable across formatting of the same value.
        let a = rewrite(
            "4111 1111 1111 1234",
            &[(CREDIT_CARD, "4111 1111 1111 1234")],
            Action::Hash,
        )
        .0;
        let b = rewrite(
            "4111-1111-1111-1234",
            &[(CREDIT_CARD, "4111-1111-1111-1234")],
            Action::Hash,
        )
        .0;
        assert_eq!(a, b);
        let (pseudo, mapping) = rewrite(text, &found, Action::Pseudonymize);
        assert_eq!(
            pseudo,
            "mail <EMAIL_ADDRESS_1> card <CREDIT_CARD_1> tok <GITHUB_TOKEN_1>"
        );
        assert_eq!(mapping.get("<CREDIT_CARD_1>"), Some("4111 1111 1111 1234"));
        assert_eq!(rewrite(text, &found, Action::Allow).0, text);
    }

    #[test]
    fn masks_keep_the_last_digits_of_numbers_only() {
        assert_eq!(
            rewrite("ssn 536-22-5436", &[(US_SSN, "536-22-5436")], Action::Mask).0,
            "ssn ****5436"
        );
        assert_eq!(
            rewrite(
                "+1 202-555-0123",
                &[(PHONE_NUMBER, "+1 202-555-0123")],
                Action::Mask
            )
            .0,
            "****0123"
        );
    }

    #[test]
    fn pseudonyms_are_consistent_and_avoid_placeholders_already_in_the_text() {
        let text = "<EMAIL_ADDRESS_1> is a@x.io, again A@X.io, and b@x.io";
        let (out, mapping) = rewrite(
            text,
            &[
                (EMAIL_ADDRESS, "a@x.io"),
                (EMAIL_ADDRESS, "A@X.io"),
                (EMAIL_ADDRESS, "b@x.io"),
            ],
            Action::Pseudonymize,
        );
        assert_eq!(
            out,
            "<EMAIL_ADDRESS_1> is <EMAIL_ADDRESS_2>, again <EMAIL_ADDRESS_2>, and <EMAIL_ADDRESS_3>"
        );
        assert_eq!(mapping.len(), 2);
        assert_eq!(mapping.get("<EMAIL_ADDRESS_2>"), Some("a@x.io"));
    }

    #[test]
    fn rewriting_edits_the_original_text_of_an_evasive_match() {
        let text = "mail jаnе\u{200B}@ехample.com now";
        let view = Normalized::new(text);
        let at = view.text().find("jane@example.com").unwrap();
        let m = Match {
            entity_type: EMAIL_ADDRESS,
            range: at..at + "jane@example.com".len(),
            score: 1.0,
        };
        let renderer = renderer();
        let mut rewriter = Rewriter::new(&renderer, vec![text]);
        let out = rewriter.rewrite(text, &view, &[m], |_| Action::Pseudonymize);
        assert_eq!(out, "mail <EMAIL_ADDRESS_1> now");
        assert_eq!(
            rewriter.mapping.get("<EMAIL_ADDRESS_1>"),
            Some("jаnе\u{200B}@ехample.com")
        );
    }
}
