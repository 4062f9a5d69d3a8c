//! The Anthropic Messages wire format (`POST /v1/messages`, version `2023-06-01`).

use axum::{
    Json,
    body::Bytes,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Rejected, StreamPlan,
    answer::{Answer, Call, Finish, Prompt, split_pieces, word_count},
};

pub(crate) fn error_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({ "type": "error", "error": { "type": kind, "message": message },
                       "request_id": "req_fake" });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
    }
    response
}

pub(crate) fn context_length_exceeded(prompt: &Prompt) -> Response {
    error_response(
        400,
        &format!(
            "prompt is too long: {} tokens > 200000 maximum",
            200_000 + prompt.prompt_words
        ),
    )
}

fn blocks_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(text) => vec![json!({ "type": "text", "text": text })],
        Value::Array(blocks) => blocks.clone(),
        _ => Vec::new(),
    }
}

fn text_of(blocks: &[Value]) -> String {
    blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Words of a `tool_result`'s content (a string or text blocks).
fn result_words(block: &Value) -> u64 {
    match block.get("content") {
        Some(Value::String(text)) => word_count(text),
        Some(Value::Array(blocks)) => word_count(&text_of(blocks)),
        _ => 0,
    }
}

/// The fake's signature of a thinking block's text (the real API's is opaque too; the fake checks
/// it when the block comes back, as the real one does).
pub(crate) fn signature_of(thinking: &str) -> String {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in thinking.bytes() {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fakesig{state:016x}")
}

/// The thinking text of an answer to `prompt` (extended thinking enabled).
fn thinking_of(prompt: &Prompt) -> String {
    format!("thinking about: {}", prompt.last_user)
}

/// Reads `thinking` (`{"type":"enabled","budget_tokens"}` or `{"type":"disabled"}`): whether it is
/// enabled, validated as the real API does (a budget of at least 1024, below `max_tokens`).
fn thinking_enabled(body: &Value, max_tokens: u64) -> Result<bool, Rejected> {
    let Some(thinking) = body.get("thinking") else {
        return Ok(false);
    };
    match thinking.get("type").and_then(Value::as_str) {
        Some("disabled") => Ok(false),
        Some("enabled") => {
            let budget = thinking
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| Rejected::bad("thinking.enabled.budget_tokens: Field required"))?;
            if budget < 1024 {
                return Err(Rejected::bad(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
                ));
            }
            if budget >= max_tokens {
                return Err(Rejected::bad(
                    "`max_tokens` must be greater than `thinking.budget_tokens`",
                ));
            }
            Ok(true)
        }
        _ => Err(Rejected::bad(
            "thinking: Input tag does not match any of the expected tags: 'enabled', 'disabled'",
        )),
    }
}

/// Reads a Messages request, validating what the real API validates and that the adapter might
/// get wrong: headers, `max_tokens`, roles, non-empty text blocks, `tool_result`s answering a
/// `tool_use` of the assistant turn just before, `thinking`, and the signatures of thinking
/// blocks sent back (`thinking` and `redacted_thinking` only in assistant turns).
pub(crate) fn parse(headers: &HeaderMap, body: &Value) -> Result<Prompt, Rejected> {
    if !headers.contains_key("x-api-key") && !headers.contains_key(header::AUTHORIZATION) {
        return Err(Rejected {
            status: 401,
            message: "x-api-key header is required".to_owned(),
        });
    }
    if !headers.contains_key("anthropic-version") {
        return Err(Rejected::bad("anthropic-version: header is required"));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejected::bad("model: Field required"))?
        .to_owned();
    let max_tokens = body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| Rejected::bad("max_tokens: Field required"))?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Rejected::bad("messages: at least one message is required"))?;
    let thinking = thinking_enabled(body, max_tokens)?;
    let mut prompt_words = match body.get("system") {
        Some(Value::String(text)) => word_count(text),
        Some(Value::Array(blocks)) => word_count(&text_of(blocks)),
        _ => 0,
    };
    let mut last_user = None;
    let mut previous_tool_uses: Vec<String> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(Rejected::bad(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            )));
        }
        let blocks = blocks_of(message.get("content").unwrap_or(&Value::Null));
        if blocks.is_empty() {
            return Err(Rejected::bad(format!(
                "messages.{i}: all messages must have non-empty content"
            )));
        }
        let mut tool_uses = Vec::new();
        let mut only_results = true;
        for (j, block) in blocks.iter().enumerate() {
            match block.get("type").and_then(Value::as_str) {
                Some("thinking") if role == "assistant" => {
                    let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
                    let signature = block.get("signature").and_then(Value::as_str);
                    if signature != Some(signature_of(text).as_str()) {
                        return Err(Rejected::bad(format!(
                            "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                        )));
                    }
                }
                Some("redacted_thinking") if role == "assistant" => {
                    if block
                        .get("data")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        return Err(Rejected::bad(format!(
                            "messages.{i}.content.{j}.redacted_thinking.data: Field required"
                        )));
                    }
                }
                Some("text") => {
                    let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                    if text.is_empty() {
                        return Err(Rejected::bad(format!(
                            "messages.{i}: text content blocks must be non-empty"
                        )));
                    }
                    prompt_words += word_count(text);
                    only_results = false;
                }
                Some("tool_use") if role == "assistant" => {
                    if !block.get("input").is_some_and(Value::is_object) {
                        return Err(Rejected::bad(format!(
                            "messages.{i}: tool_use.input must be an object"
                        )));
                    }
                    tool_uses.push(
                        block
                            .get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
                Some("tool_result") if role == "user" => {
                    let id = block
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if !previous_tool_uses.iter().any(|u| u == id) {
                        return Err(Rejected::bad(format!(
                            "messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                        )));
                    }
                    prompt_words += result_words(block);
                }
                Some("image") => only_results = false,
                other => {
                    return Err(Rejected::bad(format!(
                        "messages.{i}: unexpected content block type {other:?} for role {role}"
                    )));
                }
            }
        }
        if role == "user" && !only_results {
            last_user = Some(text_of(&blocks));
        }
        previous_tool_uses = tool_uses;
    }
    let tools = match body.get("tools").and_then(Value::as_array) {
        Some(tools) => {
            let mut names = Vec::new();
            for (i, tool) in tools.iter().enumerate() {
                if tool.get("input_schema").is_none() {
                    return Err(Rejected::bad(format!(
                        "tools.{i}.custom.input_schema: Field required"
                    )));
                }
                if let Some(name) = tool.get("name").and_then(Value::as_str) {
                    names.push(name.to_owned());
                }
            }
            names
        }
        None => Vec::new(),
    };
    Ok(Prompt {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: true,
        prompt_words,
        last_user: last_user.unwrap_or_default(),
        tools,
        max_tokens: Some(max_tokens),
        thinking,
        stop_sequences: body
            .get("stop_sequences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
    })
}

/// A text answer cut before the first of `request`'s stop sequences it contains (the answer,
/// the matched sequence and the output tokens), as the real API stops.
fn cut_at_stop(
    request: &Prompt,
    answer: &Answer,
    completion: u64,
) -> (Answer, Option<String>, u64) {
    if let Answer::Text {
        content,
        finish: Finish::Stop,
    } = answer
        && let Some((at, sequence)) = request
            .stop_sequences
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| content.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at)
    {
        let cut = content[..at].to_owned();
        let words = word_count(&cut);
        return (
            Answer::Text {
                content: cut,
                finish: Finish::Stop,
            },
            Some(sequence.clone()),
            words,
        );
    }
    (answer.clone(), None, completion)
}

fn stop_reason_of(answer: &Answer, sequence: Option<&String>) -> &'static str {
    if sequence.is_some() {
        "stop_sequence"
    } else {
        stop_reason(answer)
    }
}

fn stop_reason(answer: &Answer) -> &'static str {
    match answer {
        Answer::Text {
            finish: Finish::Stop,
            ..
        } => "end_turn",
        Answer::Text {
            finish: Finish::Length,
            ..
        } => "max_tokens",
        Answer::Text {
            finish: Finish::ContentFilter | Finish::Refusal,
            ..
        } => "refusal",
        Answer::ToolCalls(_) => "tool_use",
    }
}

fn input_of(call: &Call) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}))
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({ "input_tokens": prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": completion })
}

pub(crate) fn message_json(
    id: &str,
    request: &Prompt,
    answer: &Answer,
    prompt: u64,
    completion: u64,
) -> Value {
    let (answer, sequence, mut completion) = cut_at_stop(request, answer, completion);
    let answer = &answer;
    let mut content = Vec::new();
    if request.thinking {
        let thinking = thinking_of(request);
        completion += word_count(&thinking);
        content.push(json!({ "type": "thinking", "thinking": thinking,
                             "signature": signature_of(&thinking) }));
    }
    content.extend(match answer {
        Answer::Text { content, .. } => vec![json!({ "type": "text", "text": content })],
        Answer::ToolCalls(calls) => calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                json!({ "type": "tool_use", "id": format!("toolu_{}", i + 1), "name": call.name,
                        "input": input_of(call) })
            })
            .collect(),
    });
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop_reason_of(answer, sequence.as_ref()),
        "stop_sequence": sequence,
        "usage": usage_json(prompt, completion),
    })
}

fn frame(data: &Value) -> Bytes {
    let kind = data
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The real event sequence: `message_start`, `content_block_start`, `ping`, deltas (text or
/// `input_json_delta` pieces), `content_block_stop`, `message_delta`, `message_stop`. With
/// thinking enabled a thinking block comes first (`thinking_delta` pieces, one
/// `signature_delta`).
pub(crate) fn stream_plan(
    id: &str,
    request: &Prompt,
    answer: &Answer,
    usage: (u64, u64),
    pieces: usize,
) -> StreamPlan {
    let mut head = vec![frame(&json!({ "type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": request.model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": usage_json(usage.0, 1) } }))];
    let mut body = Vec::new();
    let mut tail = Vec::new();
    let (answer, sequence, completion) = cut_at_stop(request, answer, usage.1);
    let answer = &answer;
    let mut usage = (usage.0, completion);
    // Index of the first block after the thinking block.
    let first = u64::from(request.thinking);
    if request.thinking {
        let thinking = thinking_of(request);
        usage.1 += word_count(&thinking);
        head.push(frame(&json!({ "type": "content_block_start", "index": 0,
            "content_block": { "type": "thinking", "thinking": "" } })));
        head.push(frame(&json!({ "type": "ping" })));
        for piece in split_pieces(&thinking, pieces) {
            body.push(frame(&json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "thinking_delta", "thinking": piece } })));
        }
        body.push(frame(&json!({ "type": "content_block_delta", "index": 0,
            "delta": { "type": "signature_delta", "signature": signature_of(&thinking) } })));
        body.push(frame(&json!({ "type": "content_block_stop", "index": 0 })));
    }
    match answer {
        Answer::Text { content, .. } => {
            let start = frame(&json!({ "type": "content_block_start", "index": first,
                "content_block": { "type": "text", "text": "" } }));
            if request.thinking {
                body.push(start);
            } else {
                head.push(start);
                head.push(frame(&json!({ "type": "ping" })));
            }
            for piece in split_pieces(content, pieces) {
                body.push(frame(
                    &json!({ "type": "content_block_delta", "index": first,
                    "delta": { "type": "text_delta", "text": piece } }),
                ));
            }
            tail.push(frame(
                &json!({ "type": "content_block_stop", "index": first }),
            ));
        }
        Answer::ToolCalls(calls) => {
            if !request.thinking {
                head.push(frame(&json!({ "type": "ping" })));
            }
            for (position, call) in calls.iter().enumerate() {
                let index = first + position as u64;
                body.push(frame(
                    &json!({ "type": "content_block_start", "index": index,
                    "content_block": { "type": "tool_use", "id": format!("toolu_{}", position + 1),
                                       "name": call.name, "input": {} } }),
                ));
                // The compact JSON text, as the real API streams it.
                let arguments = input_of(call).to_string();
                for piece in split_pieces(&arguments, pieces) {
                    body.push(frame(
                        &json!({ "type": "content_block_delta", "index": index,
                        "delta": { "type": "input_json_delta", "partial_json": piece } }),
                    ));
                }
                body.push(frame(
                    &json!({ "type": "content_block_stop", "index": index }),
                ));
            }
        }
    }
    tail.push(frame(&json!({ "type": "message_delta",
        "delta": { "stop_reason": stop_reason_of(answer, sequence.as_ref()), "stop_sequence": sequence },
        "usage": { "output_tokens": usage.1 } })));
    tail.push(frame(&json!({ "type": "message_stop" })));
    StreamPlan {
        head,
        body,
        tail,
        malformed: Bytes::from(
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"unterminated\n\n",
        ),
    }
}
