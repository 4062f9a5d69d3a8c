//! Secrets: cloud and API keys, tokens, private keys. Each is a pattern plus a structural check.

use base64::Engine;
use regex::Regex;

use super::{
    ANTHROPIC_API_KEY, AWS_ACCESS_KEY, AWS_SECRET_KEY, Candidate, Context, GITHUB_TOKEN, Input,
    JWT, OPENAI_API_KEY, PRIVATE_KEY, Recognizer, SLACK_TOKEN,
};

/// A pattern (its first capture group, or the whole match) with a structural check on the value.
pub struct PatternRecognizer {
    entity_type: &'static str,
    regex: Regex,
    /// A literal every match contains (or, for context-driven ones, its context needs): the text is
    /// skipped without running the regex when it is absent.
    needle: &'static str,
    /// The needle, case-insensitively, when case does not matter.
    needle_ci: Option<Regex>,
    score: f32,
    check: fn(&str) -> bool,
    context: &'static Context,
}

impl Recognizer for PatternRecognizer {
    fn entity_type(&self) -> &'static str {
        self.entity_type
    }

    fn find(&self, input: &Input<'_>, out: &mut Vec<Candidate>) {
        let text = input.text();
        let present = match &self.needle_ci {
            Some(needle) => needle.is_match(text),
            None => self.needle.is_empty() || text.contains(self.needle),
        };
        if !present {
            return;
        }
        for captures in self.regex.captures_iter(text) {
            let Some(m) = captures.get(1).or_else(|| captures.get(0)) else {
                continue;
            };
            if (self.check)(m.as_str()) {
                out.push(Candidate {
                    range: m.range(),
                    score: self.score,
                });
            }
        }
    }

    fn context(&self) -> &Context {
        self.context
    }
}

static AWS_CONTEXT: Context = Context {
    raise: &[
        "aws",
        "aws_secret_access_key",
        "secret_access_key",
        "secretaccesskey",
        "aws_secret",
    ],
    lower: &[],
    boost: 0.5,
    penalty: 0.0,
};

/// The built-in secret recognisers.
pub(super) fn builtin() -> Result<Vec<PatternRecognizer>, regex::Error> {
    let any = |_: &str| true;
    Ok(vec![
        PatternRecognizer {
            entity_type: AWS_ACCESS_KEY,
            regex: Regex::new(r"(?-u:\b)((?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})(?-u:\b)")?,
            needle: "",
            needle_ci: None,
            score: 0.9,
            check: any,
            context: &Context::NONE,
        },
        PatternRecognizer {
            // 40 characters of base64 near "aws": 0.3 alone, 0.8 with the context word.
            entity_type: AWS_SECRET_KEY,
            regex: Regex::new(r"(?:^|[^A-Za-z0-9/+=])([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+=])")?,
            needle: "aws",
            needle_ci: Some(Regex::new("(?i)aws")?),
            score: 0.3,
            check: aws_secret_shaped,
            context: &AWS_CONTEXT,
        },
        PatternRecognizer {
            entity_type: GITHUB_TOKEN,
            regex: Regex::new(
                r"(?-u:\b)((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{60,250})(?-u:\b)",
            )?,
            needle: "",
            needle_ci: None,
            score: 0.95,
            check: any,
            context: &Context::NONE,
        },
        PatternRecognizer {
            entity_type: SLACK_TOKEN,
            regex: Regex::new(
                r"(?-u:\b)(xox[abprs]-[A-Za-z0-9]{4,}(?:-[A-Za-z0-9]{4,}){1,6})(?-u:\b)",
            )?,
            needle: "xox",
            needle_ci: None,
            score: 0.9,
            check: any,
            context: &Context::NONE,
        },
        PatternRecognizer {
            entity_type: ANTHROPIC_API_KEY,
            regex: Regex::new(r"(?-u:\b)(sk-ant-[A-Za-z0-9_\-]{32,})")?,
            needle: "sk-ant-",
            needle_ci: None,
            score: 0.95,
            check: any,
            context: &Context::NONE,
        },
        PatternRecognizer {
            // `sk-` then at least 32 characters with a digit and a letter (`sk-learn`, `sk-too-short`
            // and long hyphenated words are not keys).
            entity_type: OPENAI_API_KEY,
            regex: Regex::new(r"(?-u:\b)(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{32,})")?,
            needle: "sk-",
            needle_ci: None,
            score: 0.9,
            check: openai_key_shaped,
            context: &Context::NONE,
        },
        PatternRecognizer {
            // A whole block, or an unterminated one up to the end of its base64 body.
            entity_type: PRIVATE_KEY,
            regex: Regex::new(
                r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,\-\\]*?-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,\\]*)",
            )?,
            needle: "PRIVATE KEY",
            needle_ci: None,
            score: 0.95,
            check: any,
            context: &Context::NONE,
        },
        PatternRecognizer {
            entity_type: JWT,
            regex: Regex::new(
                r"(?-u:\b)(eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*)",
            )?,
            needle: "eyJ",
            needle_ci: None,
            score: 0.9,
            check: jwt_header_has_alg,
            context: &Context::NONE,
        },
    ])
}

/// A 40-character AWS secret mixes cases or has `/` or `+` (a hex SHA-1 does neither).
fn aws_secret_shaped(value: &str) -> bool {
    let upper = value.bytes().any(|b| b.is_ascii_uppercase());
    let lower = value.bytes().any(|b| b.is_ascii_lowercase());
    let digit = value.bytes().any(|b| b.is_ascii_digit());
    (upper && lower && digit) || value.contains(['/', '+'])
}

fn openai_key_shaped(value: &str) -> bool {
    if value.starts_with("sk-ant-") {
        return false;
    }
    let body = value.rsplit_once('-').map_or(value, |(_, b)| b);
    let body_ok =
        body.len() >= 20 || value.bytes().filter(|b| b.is_ascii_alphanumeric()).count() >= 40;
    body_ok
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().any(|b| b.is_ascii_alphabetic())
}

/// The first part decodes (base64url) to a JSON object with an `alg` member.
fn jwt_header_has_alg(value: &str) -> bool {
    let Some(header) = value.split('.').next() else {
        return false;
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    engine
        .decode(header)
        .ok()
        .and_then(|bytes| {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok()
        })
        .is_some_and(|object| object.get("alg").is_some_and(serde_json::Value::is_string))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::scanned;
    use super::*;

    fn kind(text: &str) -> Vec<(&'static str, &str)> {
        scanned(text)
    }

    const JWT_SAMPLE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

    #[test]
    fn secrets_are_found() {
        let gh = format!("ghp_{}", "a1B2".repeat(9));
        let pat = format!("github_pat_11ABCDEFG0{}", "x_Y9".repeat(18));
        let openai = format!("sk-proj-{}", "Ab3_".repeat(12));
        let openai_old = format!("sk-{}", "T3BlbkFJ9".repeat(5));
        let anthropic = format!("sk-ant-api03-{}", "Zz9-".repeat(20));
        let aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nabc+/=\n-----END RSA PRIVATE KEY-----";
        let cases: Vec<(String, &str, String)> = vec![
            (
                "key AKIAIOSFODNN7EXAMPLE here".to_owned(),
                AWS_ACCESS_KEY,
                "AKIAIOSFODNN7EXAMPLE".into(),
            ),
            (
                "ASIAY34FZKBOKMUTVV7A".to_owned(),
                AWS_ACCESS_KEY,
                "ASIAY34FZKBOKMUTVV7A".into(),
            ),
            (
                format!("aws_secret_access_key = {aws_secret}"),
                AWS_SECRET_KEY,
                aws_secret.into(),
            ),
            (format!("token: {gh}."), GITHUB_TOKEN, gh.clone()),
            (pat.clone(), GITHUB_TOKEN, pat.clone()),
            (
                "SLACK=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
                SLACK_TOKEN,
                "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
            ),
            (
                format!("OPENAI_API_KEY={openai}"),
                OPENAI_API_KEY,
                openai.clone(),
            ),
            (
                format!("key {openai_old}"),
                OPENAI_API_KEY,
                openai_old.clone(),
            ),
            (
                format!("x-api-key: {anthropic}"),
                ANTHROPIC_API_KEY,
                anthropic.clone(),
            ),
            (format!("here:\n{pem}\nthanks"), PRIVATE_KEY, pem.into()),
            (format!("Bearer {JWT_SAMPLE}"), JWT, JWT_SAMPLE.into()),
        ];
        for (text, entity, value) in &cases {
            assert_eq!(kind(text), [(*entity, value.as_str())], "{text}");
        }
        // An unterminated key block is still a key.
        let cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAA";
        assert_eq!(kind(cut), [(PRIVATE_KEY, cut)]);
    }

    #[test]
    fn near_misses_are_not_secrets() {
        for text in [
            // Too short.
            "sk-learn is a library",
            "use sk-too-short-1",
            "sk-ant-short",
            "ghp_abc123",
            "xoxb-123",
            // Long hyphenated words without digits.
            "sk-this-is-a-very-long-hyphenated-description-of-things",
            // A git SHA near "aws" and a 40-char secret without "aws" nearby.
            "aws commit 3f786850e387550fdab836ed7e6dc881de23001b",
            "token wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            // Header that is not JSON with alg; a public key.
            "eyJub3RhbGciOiJ4In0.eyJzdWIiOiIxIn0.c2ln",
            "eyJhbGciOiJIUzI1NiJ9x.not-json-here.sig",
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----",
            // Lower-case or embedded key ids.
            "akiaiosfodnn7example",
            "XAKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(kind(text).is_empty(), "{text}: {:?}", kind(text));
        }
    }
}
