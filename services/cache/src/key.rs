//! The exact-match cache key: SHA-256 over a canonical, versioned, unambiguously framed encoding of
//! everything that changes the answer, or which provider and model give it.
//!
//! Every string is length-prefixed, every list and map count-prefixed, every optional and every
//! `oneof` tagged, and fields come in a fixed order, so the encoding is prefix-free: two different
//! requests cannot produce the same byte stream by concatenation. Unset message fields
//! (`sampling`, `tool_choice`, `response_format`) encode like their defaults, since providers treat
//! them the same.
//!
//! The caller's team and the request's `tags` are in the key: the router routes on them (rules on
//! the team, the `task` tag and any other tag, e.g. a data-residency rule), so the same prompt of
//! two teams, or with other tags, may be answered by another provider and must not share an
//! answer. Tags are hashed sorted by name (a map has no order). `user` is left out: it changes
//! neither the answer nor the route. Bump [`KEY_VERSION`] whenever the encoding changes.

use std::collections::HashMap;

use serde_json::Value;
use sha2::{Digest, Sha256};
use switchboard_proto::chat::v1::{
    ChatRequest, Message, ResponseFormat, SamplingParams, ThinkingConfig, Tool, ToolChoice,
    content_part::Part, tool_choice::Choice,
};

/// Version tag hashed first; changing the encoding must change it.
pub const KEY_VERSION: &str = "switchboard.cache.exact.v4";

/// A 32-byte cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The key of `request` of `team` in the scope of `app`.
    pub fn of(app: &str, team: &str, request: &ChatRequest) -> Self {
        let mut enc = Encoder(Sha256::new());
        enc.str(KEY_VERSION);
        enc.str(app);
        enc.str(team);
        enc.tags(&request.tags);
        enc.str(&request.model);
        enc.count(request.messages.len());
        for message in &request.messages {
            enc.message(message);
        }
        enc.count(request.tools.len());
        for tool in &request.tools {
            enc.tool(tool);
        }
        enc.tool_choice(&request.tool_choice.clone().unwrap_or_default());
        enc.sampling(&request.sampling.clone().unwrap_or_default());
        enc.response_format(&request.response_format.clone().unwrap_or_default());
        enc.opt(request.parallel_tool_calls, |enc, v| enc.bool(v));
        enc.thinking_config(request.thinking.as_ref());
        CacheKey(enc.0.finalize().into())
    }

    /// Lowercase hex of the whole key.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs.
    pub fn prefix(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

/// Version tag of the semantic scope encoding; changing it must change this.
pub const SCOPE_VERSION: &str = "switchboard.cache.semantic-scope.v3";

/// The compatibility scope of a semantic lookup: a hash of everything that changes the answer (or
/// its route) except the text of the final user message. Two requests can share a semantic answer
/// only within one scope, so nothing is ever matched across apps, teams, tags, models, system
/// prompts, earlier turns, tools, tool choice, sampling parameters or response formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey(pub [u8; 32]);

impl ScopeKey {
    /// The scope of `request` of `team` in `app` and the text to embed (the final user message's
    /// text parts, joined), or `None` when the request cannot be matched semantically: its last
    /// message is not from the user, has no text, or carries anything besides text (an image).
    pub fn of(app: &str, team: &str, request: &ChatRequest) -> Option<(ScopeKey, String)> {
        let (last, earlier) = request.messages.split_last()?;
        if last.role != switchboard_proto::chat::v1::Role::User as i32
            || !last.tool_calls.is_empty()
            || !last.tool_call_id.is_empty()
        {
            return None;
        }
        let mut text = String::new();
        for part in &last.content {
            match &part.part {
                Some(Part::Text(t)) => text.push_str(t),
                _ => return None,
            }
        }
        if text.trim().is_empty() {
            return None;
        }
        let mut enc = Encoder(Sha256::new());
        enc.str(SCOPE_VERSION);
        enc.str(app);
        enc.str(team);
        enc.tags(&request.tags);
        enc.str(&request.model);
        enc.count(earlier.len());
        for message in earlier {
            enc.message(message);
        }
        // The final message's sender name still counts; only its text is compared by meaning.
        enc.str(&last.name);
        enc.count(request.tools.len());
        for tool in &request.tools {
            enc.tool(tool);
        }
        enc.tool_choice(&request.tool_choice.clone().unwrap_or_default());
        enc.sampling(&request.sampling.clone().unwrap_or_default());
        enc.response_format(&request.response_format.clone().unwrap_or_default());
        enc.opt(request.parallel_tool_calls, |enc, v| enc.bool(v));
        enc.thinking_config(request.thinking.as_ref());
        Some((ScopeKey(enc.0.finalize().into()), text))
    }

    /// The first 12 hex digits, for logs.
    pub fn prefix(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

struct Encoder(Sha256);

impl Encoder {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn tag(&mut self, tag: u8) {
        self.0.update([tag]);
    }
    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.update(v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.update(v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.update(v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.tag(u8::from(v));
    }
    fn f64(&mut self, v: f64) {
        // -0.0 and 0.0 sample the same.
        let v = if v == 0.0 { 0.0 } else { v };
        self.0.update(v.to_bits().to_le_bytes());
    }
    fn opt<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                write(self, v);
            }
        }
    }

    /// A map of tags, sorted by name (each name and value framed), so that the order a map
    /// iterates in never matters.
    fn tags(&mut self, tags: &HashMap<String, String>) {
        let mut sorted: Vec<(&String, &String)> = tags.iter().collect();
        sorted.sort_unstable();
        self.count(sorted.len());
        for (name, value) in sorted {
            self.str(name);
            self.str(value);
        }
    }

    fn message(&mut self, message: &Message) {
        self.i32(message.role);
        self.count(message.content.len());
        for part in &message.content {
            match &part.part {
                None => self.tag(0),
                Some(Part::Text(text)) => {
                    self.tag(1);
                    self.str(text);
                }
                Some(Part::ImageUrl(image)) => {
                    self.tag(2);
                    self.str(&image.url);
                    self.str(&image.detail);
                }
            }
        }
        self.str(&message.name);
        self.count(message.tool_calls.len());
        for call in &message.tool_calls {
            self.str(&call.id);
            self.str(&call.name);
            // The model sees the arguments as text, so they are hashed exactly as given.
            self.str(&call.arguments_json);
            // Gemini's signature carries the model's reasoning state back to it.
            self.str(&call.signature);
        }
        self.str(&message.tool_call_id);
        self.bool(message.tool_error);
        // Thinking blocks sent back to the provider are part of what it reads.
        self.count(message.thinking.len());
        for block in &message.thinking {
            self.str(&block.text);
            self.str(&block.signature);
            self.str(&block.redacted_data);
        }
    }

    fn thinking_config(&mut self, config: Option<&ThinkingConfig>) {
        self.opt(config, |enc, c| {
            enc.bool(c.enabled);
            enc.u32(c.budget_tokens);
            enc.str(&c.effort);
        });
    }

    fn tool(&mut self, tool: &Tool) {
        self.str(&tool.name);
        self.str(&tool.description);
        self.json(&tool.parameters_json);
        self.bool(tool.strict);
    }

    /// Valid JSON is hashed in canonical form (sorted keys, no insignificant whitespace); anything
    /// else as its raw text, under a different tag so the two can never be confused.
    fn json(&mut self, text: &str) {
        if text.is_empty() {
            self.tag(0);
            return;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(value) => {
                self.tag(1);
                let mut canonical = String::with_capacity(text.len());
                write_canonical(&value, &mut canonical);
                self.str(&canonical);
            }
            Err(_) => {
                self.tag(2);
                self.str(text);
            }
        }
    }

    fn tool_choice(&mut self, choice: &ToolChoice) {
        match &choice.choice {
            None => self.tag(0),
            Some(Choice::Mode(mode)) => {
                self.tag(1);
                self.i32(*mode);
            }
            Some(Choice::FunctionName(name)) => {
                self.tag(2);
                self.str(name);
            }
        }
    }

    fn sampling(&mut self, s: &SamplingParams) {
        self.opt(s.temperature, Self::f64);
        self.opt(s.top_p, Self::f64);
        self.opt(s.max_tokens, Self::u32);
        self.count(s.stop.len());
        for stop in &s.stop {
            self.str(stop);
        }
        self.opt(s.presence_penalty, Self::f64);
        self.opt(s.frequency_penalty, Self::f64);
        self.opt(s.seed, Self::i64);
        self.opt(s.n, Self::u32);
        self.opt(s.top_k, Self::u32);
    }

    fn response_format(&mut self, format: &ResponseFormat) {
        self.i32(format.r#type);
        self.str(&format.schema_name);
        // Hashed as given: with structured outputs the schema's key order is the answer's key order.
        self.str(&format.json_schema_json);
        self.bool(format.strict);
    }
}

/// Compact JSON with object keys sorted (by their UTF-8 bytes), independent of serde_json features.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use proptest::prelude::*;
    use switchboard_proto::chat::v1::{
        ContentPart, ResponseFormatType, Role, ToolCall, ToolChoiceMode,
    };

    fn tool(parameters: &str) -> Tool {
        Tool {
            name: "get_weather".into(),
            description: "Weather".into(),
            parameters_json: parameters.into(),
            strict: false,
        }
    }

    fn base() -> ChatRequest {
        ChatRequest {
            model: "fast".into(),
            messages: vec![
                Message::text(Role::System, "Be terse."),
                Message::text(Role::User, "Hi"),
            ],
            tools: vec![tool(
                r#"{"type":"object","properties":{"city":{"type":"string"}}}"#,
            )],
            sampling: Some(SamplingParams {
                temperature: Some(0.2),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn key(request: &ChatRequest) -> CacheKey {
        CacheKey::of("app", "team", request)
    }

    fn with_parts(parts: &[&str]) -> ChatRequest {
        let mut request = base();
        request.messages[1].content = parts
            .iter()
            .map(|p| ContentPart {
                part: Some(Part::Text((*p).to_owned())),
            })
            .collect();
        request
    }

    #[test]
    fn key_is_stable_and_hex() {
        assert_eq!(key(&base()), key(&base()));
        assert_eq!(key(&base()).hex().len(), 64);
        assert_eq!(key(&base()).prefix(), key(&base()).hex()[..12]);
    }

    #[test]
    fn tool_parameter_key_order_and_whitespace_do_not_matter() {
        let mut a = base();
        a.tools = vec![tool(r#"{"a":1,"b":{"y":[1,2],"x":null}}"#)];
        let mut b = base();
        b.tools = vec![tool(
            "{ \"b\" : { \"x\": null, \"y\": [1, 2] },\n \"a\": 1 }",
        )];
        assert_eq!(key(&a), key(&b));
        let mut c = base();
        c.tools = vec![tool(r#"{"a":1,"b":{"y":[2,1],"x":null}}"#)];
        assert_ne!(key(&a), key(&c), "array order matters");
    }

    #[test]
    fn invalid_tool_json_is_hashed_as_raw_text() {
        let mut a = base();
        a.tools = vec![tool("{not json")];
        let mut b = base();
        b.tools = vec![tool("{not  json")];
        assert_ne!(key(&a), key(&b));
        let mut c = base();
        c.tools = vec![tool("{not json")];
        assert_eq!(key(&a), key(&c));
    }

    #[test]
    fn everything_that_changes_the_answer_changes_the_key() {
        let base_key = key(&base());
        let mut variants: Vec<(&str, ChatRequest)> = Vec::new();
        let mut r = base();
        r.model = "smart".into();
        variants.push(("model", r));
        let mut r = base();
        r.messages[0] = Message::text(Role::System, "Be verbose.");
        variants.push(("system prompt", r));
        let mut r = base();
        r.messages[0].role = Role::Developer as i32;
        variants.push(("role", r));
        let mut r = base();
        r.messages[1].name = "bob".into();
        variants.push(("name", r));
        let mut r = base();
        r.messages.push(Message {
            role: Role::Assistant as i32,
            tool_calls: vec![ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments_json: "{}".into(),
                signature: String::new(),
            }],
            ..Default::default()
        });
        variants.push(("tool call", r));
        let mut r = base();
        r.messages.push(Message {
            role: Role::Assistant as i32,
            tool_calls: vec![ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments_json: "{}".into(),
                signature: "gemini-sig".into(),
            }],
            ..Default::default()
        });
        variants.push(("tool call signature", r));
        let mut r = base();
        r.messages.push(Message {
            tool_call_id: "c".into(),
            ..Message::text(Role::Tool, "Hi")
        });
        variants.push(("tool result", r));
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(0.3),
            ..Default::default()
        });
        variants.push(("temperature", r));
        let mut r = base();
        r.sampling = None;
        variants.push(("temperature unset", r));
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(0.2),
            seed: Some(7),
            ..Default::default()
        });
        variants.push(("seed", r));
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(0.2),
            max_tokens: Some(10),
            ..Default::default()
        });
        variants.push(("max_tokens", r));
        let mut r = base();
        r.tools.clear();
        variants.push(("no tools", r));
        let mut r = base();
        r.tools[0].description = "Forecast".into();
        variants.push(("tool description", r));
        let mut r = base();
        r.tools[0].strict = true;
        variants.push(("tool strict", r));
        let mut r = base();
        r.tool_choice = Some(ToolChoice {
            choice: Some(Choice::Mode(ToolChoiceMode::Required as i32)),
        });
        variants.push(("tool choice", r));
        let mut r = base();
        r.response_format = Some(ResponseFormat {
            r#type: ResponseFormatType::JsonObject as i32,
            ..Default::default()
        });
        variants.push(("response format", r));
        let mut r = base();
        r.parallel_tool_calls = Some(false);
        variants.push(("parallel tool calls", r));
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(0.2),
            top_k: Some(40),
            ..Default::default()
        });
        variants.push(("top_k", r));
        let mut r = base();
        r.thinking = Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 2048,
            ..Default::default()
        });
        variants.push(("thinking on", r));
        let mut r = base();
        r.thinking = Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 4096,
            ..Default::default()
        });
        variants.push(("thinking budget", r));
        let mut r = base();
        r.thinking = Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 2048,
            effort: "high".into(),
        });
        variants.push(("reasoning effort", r));
        let mut r = base();
        r.messages.push(Message {
            tool_call_id: "c".into(),
            tool_error: true,
            ..Message::text(Role::Tool, "Hi")
        });
        variants.push(("tool result is an error", r));
        let mut r = base();
        r.messages.push(Message {
            thinking: vec![switchboard_proto::chat::v1::ThinkingBlock {
                text: "Let me see.".into(),
                signature: "sig".into(),
                ..Default::default()
            }],
            ..Message::text(Role::Assistant, "Sunny.")
        });
        variants.push(("thinking block in history", r));
        let mut r = base();
        r.messages.push(Message {
            thinking: vec![switchboard_proto::chat::v1::ThinkingBlock {
                text: "Let me see.".into(),
                signature: "other".into(),
                ..Default::default()
            }],
            ..Message::text(Role::Assistant, "Sunny.")
        });
        variants.push(("thinking signature", r));

        let mut seen = HashMap::new();
        for (name, request) in &variants {
            let k = key(request);
            assert_ne!(k, base_key, "{name} did not change the key");
            if let Some(other) = seen.insert(k, *name) {
                panic!("{name} and {other} collide");
            }
        }
        assert_ne!(CacheKey::of("other-app", "team", &base()), base_key, "app");
    }

    #[test]
    fn the_team_and_the_tags_change_the_key_and_the_scope_as_routing_may_differ() {
        let scope = |team: &str, r: &ChatRequest| ScopeKey::of("app", team, r).unwrap().0;
        let tagged = |tags: &[(&str, &str)]| {
            let mut r = base();
            r.tags = tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            r
        };
        // Another team: another key and another semantic scope.
        assert_ne!(
            CacheKey::of("app", "ops", &base()),
            CacheKey::of("app", "legal", &base())
        );
        assert_ne!(scope("ops", &base()), scope("legal", &base()));
        // Other tags (another value, another name, one more), likewise.
        let eu = tagged(&[("region", "eu")]);
        for other in [
            base(),
            tagged(&[("region", "us")]),
            tagged(&[("residency", "eu")]),
            tagged(&[("region", "eu"), ("task", "summarize")]),
        ] {
            assert_ne!(key(&eu), key(&other), "{:?}", other.tags);
            assert_ne!(
                scope("team", &eu),
                scope("team", &other),
                "{:?}",
                other.tags
            );
        }
        // The same team and tags: the same key, whatever order the map holds them in.
        let mut a = tagged(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let mut b = tagged(&[("c", "3"), ("a", "1"), ("b", "2")]);
        assert_eq!(key(&a), key(&b));
        assert_eq!(scope("team", &a), scope("team", &b));
        // Framed: a name/value boundary cannot move, nor can a tag pass for the team.
        a.tags = [("ab".to_owned(), "c".to_owned())].into();
        b.tags = [("a".to_owned(), "bc".to_owned())].into();
        assert_ne!(key(&a), key(&b));
        assert_ne!(
            CacheKey::of("app", "", &tagged(&[("t", "")])),
            CacheKey::of("app", "t", &base())
        );
    }

    #[test]
    fn user_and_unset_defaults_do_not_change_the_key() {
        let mut r = base();
        r.user = "u-42".into();
        assert_eq!(key(&r), key(&base()));
        let mut r = base();
        r.response_format = Some(ResponseFormat::default());
        r.tool_choice = Some(ToolChoice::default());
        assert_eq!(key(&r), key(&base()));
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(-0.0),
            ..Default::default()
        });
        let mut zero = base();
        zero.sampling = Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        });
        assert_eq!(key(&r), key(&zero));
    }

    #[test]
    fn semantic_scope_changes_with_top_k_thinking_and_tool_errors() {
        let scope = |r: &ChatRequest| ScopeKey::of("app", "team", r).map(|(s, _)| s);
        let base_scope = scope(&base());
        assert!(base_scope.is_some());
        let mut r = base();
        r.sampling = Some(SamplingParams {
            temperature: Some(0.2),
            top_k: Some(5),
            ..Default::default()
        });
        assert_ne!(scope(&r), base_scope, "top_k");
        let mut r = base();
        r.thinking = Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 1024,
            ..Default::default()
        });
        assert_ne!(scope(&r), base_scope, "thinking");
        let mut r = base();
        r.messages.insert(
            1,
            Message {
                tool_call_id: "c".into(),
                tool_error: true,
                ..Message::text(Role::Tool, "failed")
            },
        );
        let mut ok = r.clone();
        ok.messages[1].tool_error = false;
        assert_ne!(scope(&r), scope(&ok), "tool error");
    }

    #[test]
    fn framing_prevents_concatenation_collisions() {
        assert_ne!(
            key(&with_parts(&["ab", "c"])),
            key(&with_parts(&["a", "bc"]))
        );
        assert_ne!(key(&with_parts(&["abc"])), key(&with_parts(&["ab", "c"])));
        let mut a = base();
        a.messages = vec![
            Message::text(Role::User, "ab"),
            Message::text(Role::User, "c"),
        ];
        let mut b = base();
        b.messages = vec![
            Message::text(Role::User, "a"),
            Message::text(Role::User, "bc"),
        ];
        assert_ne!(key(&a), key(&b));
        // App and model are framed too.
        let mut m = base();
        m.model = "bfast".into();
        assert_ne!(
            CacheKey::of("app", "team", &m),
            CacheKey::of("appb", "team", &base())
        );
        assert_ne!(
            CacheKey::of("app", "bteam", &base()),
            CacheKey::of("appb", "team", &base())
        );
    }

    fn json_object() -> impl Strategy<Value = Vec<(String, i64)>> {
        proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 1..8)
            .prop_map(|m| m.into_iter().collect())
    }

    fn render(entries: &[(String, i64)], spaced: bool) -> String {
        let sep = if spaced { " ,\n  " } else { "," };
        let body: Vec<String> = entries
            .iter()
            .map(|(k, v)| {
                if spaced {
                    format!("\"{k}\" : {v}")
                } else {
                    format!("\"{k}\":{v}")
                }
            })
            .collect();
        format!("{{{}}}", body.join(sep))
    }

    proptest! {
        #[test]
        fn tool_parameters_hash_equal_in_any_key_order(
            entries in json_object(), seed in any::<u64>(), spaced in any::<bool>(),
        ) {
            let mut shuffled = entries.clone();
            // A deterministic permutation driven by the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = ((seed.rotate_left(i as u32)) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let mut a = base();
            a.tools = vec![tool(&render(&entries, false))];
            let mut b = base();
            b.tools = vec![tool(&render(&shuffled, spaced))];
            prop_assert_eq!(key(&a), key(&b));
        }

        #[test]
        fn different_part_lists_and_stop_lists_never_collide(
            a in proptest::collection::vec("[ab]{0,3}", 0..4), b in proptest::collection::vec("[ab]{0,3}", 0..4),
        ) {
            prop_assume!(a != b);
            let parts = |v: &Vec<String>| with_parts(&v.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_ne!(key(&parts(&a)), key(&parts(&b)));
            let stops = |v: &Vec<String>| {
                let mut r = base();
                r.sampling = Some(SamplingParams { stop: v.clone(), ..Default::default() });
                r
            };
            prop_assert_ne!(key(&stops(&a)), key(&stops(&b)));
        }

        #[test]
        fn user_never_changes_the_key(user in ".{0,20}") {
            let mut r = base();
            r.user = user;
            prop_assert_eq!(key(&r), key(&base()));
        }

        #[test]
        fn different_tag_maps_never_collide(
            a in proptest::collection::hash_map("[ab]{0,3}", "[ab]{0,3}", 0..4),
            b in proptest::collection::hash_map("[ab]{0,3}", "[ab]{0,3}", 0..4),
        ) {
            let with = |tags: &HashMap<String, String>| {
                let mut r = base();
                r.tags = tags.clone();
                r
            };
            prop_assert_eq!(a == b, key(&with(&a)) == key(&with(&b)));
        }

        #[test]
        fn temperature_changes_the_key(t1 in 0.0f64..2.0, t2 in 0.0f64..2.0) {
            prop_assume!(t1 != t2);
            let with = |t: f64| {
                let mut r = base();
                r.sampling = Some(SamplingParams { temperature: Some(t), ..Default::default() });
                r
            };
            prop_assert_ne!(key(&with(t1)), key(&with(t2)));
        }
    }
}
