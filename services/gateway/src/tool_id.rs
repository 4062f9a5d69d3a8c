//! Gemini thought signatures in tool-call ids, for the faces whose wire format has no field for
//! them (OpenAI chat completions, Anthropic Messages).
//!
//! Gemini returns a `thoughtSignature` with a function call (`ToolCall.signature`) and wants it
//! back with that call on the next turn. As LiteLLM does, a signed call's id is shown to such
//! clients as `<id>__thought__<signature>`, the signature in URL-safe base64 without padding (it
//! is standard base64, whose `+`, `/` and `=` some clients and Anthropic's `tool_use.id` pattern
//! `^[a-zA-Z0-9_-]+$` refuse), and the client sends that id back unchanged. [`decode`] splits it
//! again at the last marker.
//!
//! Lossless both ways: an unsigned call keeps its id; an id that itself contains the marker is
//! shown with a marker and an empty signature appended, so that it comes back whole; an id whose
//! part after the last marker is not URL-safe base64 of UTF-8 text (a client's own id) is kept as
//! is, without a signature; a marker with nothing after it gives no signature.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// Separates the id from the encoded signature.
pub const MARKER: &str = "__thought__";

/// The id shown to a client for a call with `id` and Gemini `signature` (empty: none).
pub fn encode(id: &str, signature: &str) -> String {
    if signature.is_empty() && !id.contains(MARKER) {
        return id.to_owned();
    }
    format!("{id}{MARKER}{}", URL_SAFE_NO_PAD.encode(signature))
}

/// The `(id, signature)` of an id a client sent back (signature empty: none).
pub fn decode(shown: &str) -> (String, String) {
    if let Some((id, encoded)) = shown.rsplit_once(MARKER)
        && let Ok(bytes) = URL_SAFE_NO_PAD.decode(encoded)
        && let Ok(signature) = String::from_utf8(bytes)
    {
        return (id.to_owned(), signature);
    }
    (shown.to_owned(), String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(id: &str, signature: &str) {
        let shown = encode(id, signature);
        assert_eq!(
            decode(&shown),
            (id.to_owned(), signature.to_owned()),
            "{shown}"
        );
    }

    #[test]
    fn a_signature_rides_in_the_id_in_id_safe_characters() {
        let shown = encode("call_0", "c2ln+/x==");
        assert_eq!(shown, format!("call_0{MARKER}YzJsbisveD09"));
        assert!(
            shown
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{shown}"
        );
        round_trip("call_0", "c2ln+/x==");
        round_trip("toolu_01", "fake/thought+sig0123456789abcdefAA==");
        round_trip("call_0", "not base64 at all: é ✓");
    }

    #[test]
    fn unsigned_and_foreign_ids_pass_unchanged() {
        assert_eq!(encode("call_1", ""), "call_1");
        round_trip("call_1", "");
        round_trip("", "");
        // A client's own id with the marker and something that is no encoding after it.
        for foreign in [
            "a__thought__b",
            "a__thought__!!",
            "a__thought__YQ=",
            "x__thought__/",
        ] {
            assert_eq!(
                decode(foreign),
                (foreign.to_owned(), String::new()),
                "{foreign}"
            );
        }
    }

    #[test]
    fn a_marker_with_an_empty_signature_gives_no_signature() {
        assert_eq!(
            decode("call_1__thought__"),
            ("call_1".to_owned(), String::new())
        );
    }

    #[test]
    fn ids_containing_the_marker_come_back_whole() {
        assert_eq!(encode("a__thought__b", ""), "a__thought__b__thought__");
        round_trip("a__thought__b", "");
        round_trip("a__thought__YQ", "");
        round_trip("a__thought__YQ", "sig==");
        round_trip("__thought__", "s");
    }
}
