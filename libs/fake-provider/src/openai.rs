//! The OpenAI chat-completions wire format (also Azure OpenAI's, which adds content-filter results).

use axum::{
    Json,
    body::Bytes,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Rejected, StreamPlan,
    answer::{Answer, Finish, Prompt, split_pieces, word_count},
};

/// Identity of one answer.
pub(crate) struct Ctx<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
    /// Azure OpenAI: add `prompt_filter_results` / `content_filter_results`.
    pub azure: bool,
}

pub(crate) fn error_response(status: u16, message: &str, code: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, default_code) = match status.as_u16() {
        400 => ("invalid_request_error", Value::Null),
        401 => ("invalid_request_error", json!("invalid_api_key")),
        403 => ("permission_error", Value::Null),
        404 => ("invalid_request_error", json!("model_not_found")),
        429 => ("requests", json!("rate_limit_exceeded")),
        _ => ("server_error", Value::Null),
    };
    let code = code.map_or(default_code, |c| json!(c));
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
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
            "This model's maximum context length is 128000 tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
            128_000 + prompt.prompt_words
        ),
        Some("context_length_exceeded"),
    )
}

/// OpenAI / Azure: the prompt tripped the content filter (HTTP 400, code `content_filter`).
pub(crate) fn prompt_filtered() -> Response {
    let body = json!({ "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "type": null, "param": "prompt", "code": "content_filter", "status": 400,
        "innererror": { "code": "ResponsibleAIPolicyViolation", "content_filter_result": {
            "hate": { "filtered": false, "severity": "safe" },
            "violence": { "filtered": true, "severity": "high" } } } } });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Reads an OpenAI chat-completions body.
pub(crate) fn parse(body: &Value, model: Option<String>) -> Result<Prompt, Rejected> {
    let model = match model {
        Some(model) => model,
        None => body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Rejected::bad("you must provide a model parameter"))?,
    };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Rejected::bad("'messages' must be a non-empty array"))?;
    let prompt_words = messages.iter().map(|m| word_count(&message_text(m))).sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .unwrap_or_default();
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|tool| tool.pointer("/function/name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let max_tokens = body
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64));
    Ok(Prompt {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        prompt_words,
        last_user,
        tools,
        max_tokens,
        thinking: false,
        stop_sequences: Vec::new(),
    })
}

pub(crate) fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

fn finish_name(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::ContentFilter => "content_filter",
        Finish::Refusal => "stop",
    }
}

fn filter_results(filtered: bool) -> Value {
    let ok = json!({ "filtered": false, "severity": "safe" });
    json!({
        "hate": ok, "self_harm": ok, "sexual": ok,
        "violence": if filtered { json!({ "filtered": true, "severity": "medium" }) } else { ok.clone() },
    })
}

fn prompt_filter_results() -> Value {
    json!([{ "prompt_index": 0, "content_filter_results": filter_results(false) }])
}

fn tool_calls_json(calls: &[crate::answer::Call]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            json!({ "id": format!("call_{}", i + 1), "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments } })
        })
        .collect()
}

pub(crate) fn completion_json(ctx: &Ctx, answer: &Answer, prompt: u64, completion: u64) -> Value {
    let (message, finish_reason) = match answer {
        Answer::Text {
            content,
            finish: Finish::Refusal,
        } => (
            json!({ "role": "assistant", "content": null, "refusal": content }),
            "stop",
        ),
        Answer::Text { content, finish } => (
            json!({ "role": "assistant", "content": content, "refusal": null }),
            finish_name(*finish),
        ),
        Answer::ToolCalls(calls) => (
            json!({ "role": "assistant", "content": null, "refusal": null, "tool_calls": tool_calls_json(calls) }),
            "tool_calls",
        ),
    };
    let mut choice =
        json!({ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason });
    let mut value = json!({
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [],
        "usage": usage_json(prompt, completion),
        "system_fingerprint": "fp_fake",
    });
    if ctx.azure {
        choice["content_filter_results"] = filter_results(finish_reason == "content_filter");
        value["prompt_filter_results"] = prompt_filter_results();
    }
    value["choices"] = json!([choice]);
    value
}

fn frame(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The streamed answer: role chunk; content (refusal, or tool-call) pieces; finish, usage and
/// `[DONE]`.
pub(crate) fn stream_plan(
    ctx: &Ctx,
    answer: &Answer,
    usage: Option<Value>,
    pieces: usize,
) -> StreamPlan {
    let chunk = |delta: Value, finish_reason: Value| {
        let mut choice =
            json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason });
        if ctx.azure && finish_reason.is_null() && delta.get("role").is_none() {
            choice["content_filter_results"] = filter_results(false);
        }
        frame(
            &json!({
                "id": ctx.id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model,
                "system_fingerprint": "fp_fake",
                "choices": [choice],
            })
            .to_string(),
        )
    };
    let mut head = Vec::new();
    if ctx.azure {
        // Azure opens every stream with the prompt's filter results: no id, no model, no choices.
        head.push(frame(
            &json!({ "id": "", "object": "", "created": 0, "model": "", "choices": [],
                     "prompt_filter_results": prompt_filter_results() })
            .to_string(),
        ));
    }
    let mut body = Vec::new();
    let finish_reason = match answer {
        Answer::Text {
            content,
            finish: Finish::Refusal,
        } => {
            // As OpenAI streams a refusal: `refusal` pieces, `content` null.
            head.push(chunk(
                json!({ "role": "assistant", "content": null, "refusal": "" }),
                Value::Null,
            ));
            for piece in split_pieces(content, pieces) {
                body.push(chunk(json!({ "refusal": piece }), Value::Null));
            }
            "stop"
        }
        Answer::Text { content, finish } => {
            head.push(chunk(
                json!({ "role": "assistant", "content": "", "refusal": null }),
                Value::Null,
            ));
            for piece in split_pieces(content, pieces) {
                body.push(chunk(json!({ "content": piece }), Value::Null));
            }
            finish_name(*finish)
        }
        Answer::ToolCalls(calls) => {
            head.push(chunk(
                json!({ "role": "assistant", "content": null, "refusal": null }),
                Value::Null,
            ));
            for (index, call) in calls.iter().enumerate() {
                body.push(chunk(
                    json!({ "tool_calls": [{ "index": index, "id": format!("call_{}", index + 1), "type": "function",
                        "function": { "name": call.name, "arguments": "" } }] }),
                    Value::Null,
                ));
                for piece in split_pieces(&call.arguments, pieces) {
                    body.push(chunk(
                        json!({ "tool_calls": [{ "index": index, "function": { "arguments": piece } }] }),
                        Value::Null,
                    ));
                }
            }
            "tool_calls"
        }
    };
    let mut tail = vec![chunk(json!({}), json!(finish_reason))];
    if let Some(usage) = usage {
        tail.push(frame(
            &json!({
                "id": ctx.id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            })
            .to_string(),
        ));
    }
    tail.push(frame("[DONE]"));
    StreamPlan {
        head,
        body,
        tail,
        malformed: frame(&format!(
            "{{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\":{{\"content\":\"unterminated",
            ctx.id
        )),
    }
}
