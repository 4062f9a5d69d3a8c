//! Golden translation tests: every `tests/fixtures/<kind>/*.json` pins, for one provider kind, the
//! body and URL we send for a `ChatRequest`, and what we make of the provider's answer or stream.
//!
//! Fixture fields: `description`, `source` (the API reference the provider side was written from),
//! `model`, `stream`, optional provider settings (`base_url`, `api_version`, `default_max_tokens`,
//! `max_tokens_field`), `request` (a `ChatRequest` in the JSON form of [`request_from_json`]),
//! `provider_request` (the exact body), `url` (optional), and either `provider_response` +
//! `expected_response` / `expected_error` (unary) or `provider_stream` (the lines of the SSE body)
//! + `expected_chunks` + `expected_end` (`"done"` or an error code).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde_json::{Map, Value, json};
use switchboard_proto::chat::v1::{
    ChatChunk, ChatRequest, ChatResponse, ContentPart, FinishReason, ImageUrl, Message,
    ResponseFormat, ResponseFormatType, Role, SamplingParams, ThinkingBlock, ThinkingConfig, Tool,
    ToolCall, ToolChoice, ToolChoiceMode, Usage, content_part::Part,
    tool_choice::Choice as ToolChoiceKind,
};

use super::{ProviderClient, ProviderError, decoder, parse_response, sse::SseParser};
use crate::config::{ProviderConfig, ProviderKind};

const CREATED: i64 = 1_700_000_000;

fn role(name: &str) -> Role {
    match name {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => panic!("unknown role {other}"),
    }
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role).unwrap() {
        Role::System => "system",
        Role::Developer => "developer",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
        Role::Unspecified => "",
    }
}

fn finish_name(reason: i32) -> &'static str {
    match FinishReason::try_from(reason).unwrap() {
        FinishReason::Unspecified => "",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Error => "error",
    }
}

fn str_of(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Text of a JSON value that is itself JSON (a schema): compact.
fn json_text(value: Option<&Value>) -> String {
    value.map(Value::to_string).unwrap_or_default()
}

/// A `ChatRequest` from a compact JSON form close to OpenAI's: messages with `content` (string or
/// parts `{"text"}` / `{"image_url": {"url", "detail"}}`), `tool_calls`
/// (`{"id","name","arguments","signature"}`), `tool_call_id`, `tool_error`, `thinking`
/// (`{"text","signature","redacted_data"}`), `refusal`; `thinking` (`{"enabled","budget_tokens"}`); `tools`
/// with `parameters` as JSON; `tool_choice` ("none", "auto", "required" or `{"function": name}`);
/// `sampling`; `response_format` (`{"type", "schema_name", "schema", "strict"}`);
/// `parallel_tool_calls`; `user`; `tags`.
pub(crate) fn request_from_json(value: &Value) -> ChatRequest {
    let messages = value["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let content = match &m["content"] {
                Value::String(text) => vec![ContentPart {
                    part: Some(Part::Text(text.clone())),
                }],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| ContentPart {
                        part: Some(match p.get("image_url") {
                            Some(image) => Part::ImageUrl(ImageUrl {
                                url: str_of(image, "url"),
                                detail: str_of(image, "detail"),
                            }),
                            None => Part::Text(str_of(p, "text")),
                        }),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Message {
                role: role(m["role"].as_str().unwrap()) as i32,
                content,
                name: str_of(m, "name"),
                tool_calls: m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| ToolCall {
                        id: str_of(c, "id"),
                        name: str_of(c, "name"),
                        arguments_json: str_of(c, "arguments"),
                        signature: str_of(c, "signature"),
                    })
                    .collect(),
                tool_call_id: str_of(m, "tool_call_id"),
                tool_error: m
                    .get("tool_error")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                thinking: m
                    .get("thinking")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|t| ThinkingBlock {
                        text: str_of(t, "text"),
                        signature: str_of(t, "signature"),
                        redacted_data: str_of(t, "redacted_data"),
                    })
                    .collect(),
                stop_sequence: String::new(),
                refusal: str_of(m, "refusal"),
            }
        })
        .collect();
    let tools = value
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| Tool {
            name: str_of(t, "name"),
            description: str_of(t, "description"),
            parameters_json: json_text(t.get("parameters")),
            strict: t.get("strict").and_then(Value::as_bool).unwrap_or(false),
        })
        .collect();
    let tool_choice = value.get("tool_choice").map(|c| ToolChoice {
        choice: Some(match c {
            Value::String(mode) => ToolChoiceKind::Mode(match mode.as_str() {
                "none" => ToolChoiceMode::None,
                "auto" => ToolChoiceMode::Auto,
                "required" => ToolChoiceMode::Required,
                other => panic!("unknown tool choice {other}"),
            } as i32),
            other => ToolChoiceKind::FunctionName(str_of(other, "function")),
        }),
    });
    let sampling = value.get("sampling").map(|s| SamplingParams {
        temperature: s.get("temperature").and_then(Value::as_f64),
        top_p: s.get("top_p").and_then(Value::as_f64),
        max_tokens: s
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        stop: s
            .get("stop")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        presence_penalty: s.get("presence_penalty").and_then(Value::as_f64),
        frequency_penalty: s.get("frequency_penalty").and_then(Value::as_f64),
        seed: s.get("seed").and_then(Value::as_i64),
        n: s.get("n").and_then(Value::as_u64).map(|v| v as u32),
        top_k: s.get("top_k").and_then(Value::as_u64).map(|v| v as u32),
    });
    let response_format = value.get("response_format").map(|f| ResponseFormat {
        r#type: match f["type"].as_str().unwrap() {
            "text" => ResponseFormatType::Text,
            "json_object" => ResponseFormatType::JsonObject,
            "json_schema" => ResponseFormatType::JsonSchema,
            other => panic!("unknown response format {other}"),
        } as i32,
        schema_name: str_of(f, "schema_name"),
        json_schema_json: json_text(f.get("schema")),
        strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
    });
    ChatRequest {
        model: str_of(value, "model"),
        messages,
        tools,
        tool_choice,
        sampling,
        response_format,
        parallel_tool_calls: value.get("parallel_tool_calls").and_then(Value::as_bool),
        user: str_of(value, "user"),
        thinking: value.get("thinking").map(|t| ThinkingConfig {
            enabled: t.get("enabled").and_then(Value::as_bool).unwrap_or(false),
            budget_tokens: t.get("budget_tokens").and_then(Value::as_u64).unwrap_or(0) as u32,
            effort: t
                .get("effort")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        }),
        tags: value
            .get("tags")
            .and_then(Value::as_object)
            .map(|tags| {
                tags.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
    })
}

fn calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            let mut call = json!({ "id": c.id, "name": c.name, "arguments": c.arguments_json });
            // Only when set, so that older fixtures stay as they are.
            if !c.signature.is_empty() {
                call["signature"] = json!(c.signature);
            }
            call
        })
        .collect()
}

/// A `ChatResponse` as JSON (every field, enums by name, content joined).
pub(crate) fn response_json(response: &ChatResponse) -> Value {
    json!({
        "id": response.id,
        "model": response.model,
        "created": response.created,
        "choices": response.choices.iter().map(|c| {
            let message = c.message.clone().unwrap_or_default();
            let mut out = json!({
                "role": role_name(message.role), "content": message.joined_text(),
                "tool_calls": calls_json(&message.tool_calls) });
            // Newer fields only when set, so that older fixtures stay as they are.
            if !message.thinking.is_empty() {
                out["thinking"] = message.thinking.iter().map(|t| json!({
                    "text": t.text, "signature": t.signature, "redacted_data": t.redacted_data,
                })).collect();
            }
            if !message.stop_sequence.is_empty() {
                out["stop_sequence"] = json!(message.stop_sequence);
            }
            if !message.refusal.is_empty() {
                out["refusal"] = json!(message.refusal);
            }
            json!({
                "index": c.index,
                "message": out,
                "finish_reason": finish_name(c.finish_reason),
            })
        }).collect::<Vec<_>>(),
        "usage": response.usage.as_ref().map(usage_json),
    })
}

/// A `ChatChunk` as JSON, with only the fields that are set (id, model and created included).
pub(crate) fn chunk_json(chunk: &ChatChunk) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), json!(chunk.id));
    out.insert("model".into(), json!(chunk.model));
    out.insert("created".into(), json!(chunk.created));
    let choices: Vec<Value> = chunk
        .choices
        .iter()
        .map(|d| {
            let mut delta = Map::new();
            delta.insert("index".into(), json!(d.index));
            if d.role != 0 {
                delta.insert("role".into(), json!(role_name(d.role)));
            }
            if !d.content.is_empty() {
                delta.insert("content".into(), json!(d.content));
            }
            if !d.refusal.is_empty() {
                delta.insert("refusal".into(), json!(d.refusal));
            }
            if !d.tool_calls.is_empty() {
                let calls: Vec<Value> = d
                    .tool_calls
                    .iter()
                    .map(|t| {
                        let mut call = Map::new();
                        call.insert("index".into(), json!(t.index));
                        if !t.id.is_empty() {
                            call.insert("id".into(), json!(t.id));
                        }
                        if !t.name.is_empty() {
                            call.insert("name".into(), json!(t.name));
                        }
                        call.insert("arguments".into(), json!(t.arguments_delta));
                        if !t.signature.is_empty() {
                            call.insert("signature".into(), json!(t.signature));
                        }
                        Value::Object(call)
                    })
                    .collect();
                delta.insert("tool_calls".into(), Value::Array(calls));
            }
            if !d.thinking.is_empty() {
                let pieces: Vec<Value> = d
                    .thinking
                    .iter()
                    .map(|t| {
                        let mut piece = Map::new();
                        piece.insert("index".into(), json!(t.index));
                        for (key, value) in [
                            ("text", &t.text),
                            ("signature", &t.signature),
                            ("redacted_data", &t.redacted_data),
                        ] {
                            if !value.is_empty() {
                                piece.insert(key.into(), json!(value));
                            }
                        }
                        Value::Object(piece)
                    })
                    .collect();
                delta.insert("thinking".into(), Value::Array(pieces));
            }
            if d.finish_reason != 0 {
                delta.insert("finish_reason".into(), json!(finish_name(d.finish_reason)));
            }
            if !d.stop_sequence.is_empty() {
                delta.insert("stop_sequence".into(), json!(d.stop_sequence));
            }
            Value::Object(delta)
        })
        .collect();
    out.insert("choices".into(), Value::Array(choices));
    if let Some(usage) = &chunk.usage {
        out.insert("usage".into(), usage_json(usage));
    }
    Value::Object(out)
}

fn kind_of(dir: &str) -> ProviderKind {
    match dir {
        "openai" => ProviderKind::Openai,
        "azure" => ProviderKind::Azure,
        "anthropic" => ProviderKind::Anthropic,
        "gemini" => ProviderKind::Gemini,
        other => panic!("no provider kind for fixture directory {other}"),
    }
}

fn client(kind: ProviderKind, fixture: &Value) -> ProviderClient {
    let base = fixture
        .get("base_url")
        .and_then(Value::as_str)
        .unwrap_or(match kind {
            ProviderKind::Openai => "https://api.openai.com/v1",
            ProviderKind::Azure => "https://example-resource.openai.azure.com",
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com",
        });
    let mut config = ProviderConfig::of_kind(kind, base, Some("key"));
    if kind == ProviderKind::Azure {
        config.api_version = Some(
            fixture
                .get("api_version")
                .and_then(Value::as_str)
                .unwrap_or("2024-10-21")
                .to_owned(),
        );
    }
    if let Some(max) = fixture.get("default_max_tokens").and_then(Value::as_u64) {
        config.default_max_tokens = max as u32;
    }
    if let Some(field) = fixture.get("max_tokens_field") {
        config.max_tokens_field = Some(serde_json::from_value(field.clone()).unwrap());
    }
    ProviderClient::new("golden", &config, Duration::from_secs(1)).unwrap()
}

fn stream_text(fixture: &Value) -> String {
    let lines: Vec<&str> = fixture["provider_stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let ending = if fixture.get("line_ending").and_then(Value::as_str) == Some("crlf") {
        "\r\n"
    } else {
        "\n"
    };
    let mut text = lines.join(ending);
    text.push_str(ending);
    text
}

/// Decodes `text` fed in pieces of `piece` bytes: the chunks, and how the stream ended.
fn decode(
    kind: ProviderKind,
    text: &[u8],
    piece: usize,
    call_tag: &str,
) -> (Vec<ChatChunk>, Result<(), ProviderError>) {
    let mut decoder = decoder(kind, CREATED, call_tag);
    let mut parser = SseParser::new();
    let mut chunks = Vec::new();
    for bytes in text.chunks(piece) {
        for event in parser.push(bytes) {
            match decoder.event(&event) {
                Ok(decoded) => {
                    chunks.extend(decoded.chunks);
                    if decoded.done {
                        return (chunks, Ok(()));
                    }
                }
                Err(error) => return (chunks, Err(error)),
            }
        }
    }
    if parser.has_partial() {
        return (chunks, Err(ProviderError::Interrupted("partial".into())));
    }
    match decoder.end_of_body() {
        Ok(last) => {
            chunks.extend(last);
            (chunks, Ok(()))
        }
        Err(error) => (chunks, Err(error)),
    }
}

fn check(path: &PathBuf) {
    let name = path.display().to_string();
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect(&name);
    let dir = path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let kind = kind_of(dir);
    assert!(
        fixture["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://")),
        "{name}: a fixture names the API reference it follows"
    );
    let client = client(kind, &fixture);
    let request = request_from_json(&fixture["request"]);
    let stream = fixture["stream"].as_bool().unwrap_or(false);
    let model = fixture["model"].as_str().expect(&name);
    let prepared = client.prepare(model, &request, stream).expect(&name);
    assert_eq!(
        prepared.body,
        fixture["provider_request"],
        "{name}: provider request\n{}",
        serde_json::to_string_pretty(&prepared.body).unwrap()
    );
    if let Some(url) = fixture.get("url").and_then(Value::as_str) {
        assert_eq!(
            client.url(model, stream).expect(&name).as_str(),
            url,
            "{name}: url"
        );
    }
    assert!(
        !prepared.body.to_string().contains("tag-value"),
        "{name}: tags are never sent"
    );

    if let Some(response) = fixture.get("provider_response") {
        let body = serde_json::to_vec(response).unwrap();
        let parsed = parse_response(kind, &body, CREATED, &prepared.call_tag);
        match fixture.get("expected_error").and_then(Value::as_str) {
            Some(code) => assert_eq!(parsed.unwrap_err().code(), code, "{name}"),
            None => {
                let got = response_json(&parsed.expect(&name));
                assert_eq!(
                    got,
                    fixture["expected_response"],
                    "{name}: response\n{}",
                    serde_json::to_string_pretty(&got).unwrap()
                );
            }
        }
    }
    if fixture.get("provider_stream").is_some() {
        let text = stream_text(&fixture);
        let expected_end = fixture["expected_end"].as_str().expect(&name);
        for piece in [text.len(), 1, 7, 64] {
            let (chunks, end) = decode(kind, text.as_bytes(), piece, &prepared.call_tag);
            let got: Vec<Value> = chunks.iter().map(chunk_json).collect();
            assert_eq!(
                Value::Array(got.clone()),
                fixture["expected_chunks"],
                "{name}: chunks (fed in pieces of {piece})\n{}",
                serde_json::to_string_pretty(&got).unwrap()
            );
            match end {
                Ok(()) => assert_eq!(expected_end, "done", "{name}"),
                Err(error) => assert_eq!(error.code(), expected_end, "{name}: {error}"),
            }
        }
        if expected_end == "done" {
            // Without its last event, the stream has no proper end: interrupted, never clean.
            let events: Vec<&str> = text
                .split_inclusive(if text.contains("\r\n\r\n") {
                    "\r\n\r\n"
                } else {
                    "\n\n"
                })
                .collect();
            let cut = events[..events.len() - 1].concat();
            let (_, end) = decode(kind, cut.as_bytes(), cut.len().max(1), &prepared.call_tag);
            assert_eq!(
                end.map_err(|e| e.code()),
                Err("STREAM_INTERRUPTED"),
                "{name}: a stream without its last event"
            );
        }
    }
}

#[test]
fn golden_fixtures() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut count = HashMap::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for file in files {
            check(&file);
            *count
                .entry(dir.file_name().unwrap().to_string_lossy().into_owned())
                .or_insert(0) += 1;
        }
    }
    // Every provider kind is pinned for unary and streaming, text and tools.
    for kind in ["openai", "azure", "anthropic", "gemini"] {
        assert!(
            count.get(kind).copied().unwrap_or(0) >= 4,
            "{kind}: {count:?}"
        );
    }
}
