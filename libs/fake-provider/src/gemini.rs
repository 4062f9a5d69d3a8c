//! The Google Gemini wire format (`POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`).

use axum::{
    Json,
    body::Bytes,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Rejected, StreamPlan,
    answer::{Answer, Call, Finish, Prompt, split_pieces, word_count},
};

fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn error_body(status: u16, message: &str, details: Option<Value>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut error =
        json!({ "code": code.as_u16(), "message": message, "status": status_name(code.as_u16()) });
    if let Some(details) = details {
        error["details"] = details;
    }
    (code, Json(json!({ "error": error }))).into_response()
}

pub(crate) fn error_response(status: u16, message: &str) -> Response {
    error_body(status, message, None)
}

/// Gemini says when to retry in a `google.rpc.RetryInfo` detail, not in a header.
pub(crate) fn rate_limited(retry_after_secs: u64) -> Response {
    error_body(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        Some(
            json!([{ "@type": "type.googleapis.com/google.rpc.RetryInfo",
                      "retryDelay": format!("{retry_after_secs}s") }]),
        ),
    )
}

pub(crate) fn context_length_exceeded(prompt: &Prompt) -> Response {
    error_response(
        400,
        &format!(
            "The input token count ({}) exceeds the maximum number of tokens allowed (1048576).",
            1_048_576 + prompt.prompt_words
        ),
    )
}

fn text_of(parts: &[Value]) -> String {
    parts
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn response_words(response: &Value) -> u64 {
    match response.get("content") {
        Some(Value::String(text)) => word_count(text),
        _ => word_count(&response.to_string()),
    }
}

/// Reads a `generateContent` request for `model`, validating roles, parts and function responses.
/// Gemini's refusal of a call without an API key (`x-goog-api-key` header or `key=` query).
pub(crate) fn require_key(headers: &HeaderMap, query: &str) -> Result<(), Rejected> {
    let keyed = headers.contains_key("x-goog-api-key")
        || query.split('&').any(|pair| pair.starts_with("key="));
    if !keyed {
        return Err(Rejected {
            status: 403,
            message: "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.".to_owned(),
        });
    }
    Ok(())
}

pub(crate) fn parse(
    headers: &HeaderMap,
    query: &str,
    model: String,
    stream: bool,
    body: &Value,
) -> Result<Prompt, Rejected> {
    require_key(headers, query)?;
    if stream && !query.split('&').any(|pair| pair == "alt=sse") {
        return Err(Rejected::bad("the fake provider streams only with alt=sse"));
    }
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Rejected::bad("* GenerateContentRequest.contents: contents is not specified")
        })?;
    let mut prompt_words = body
        .pointer("/systemInstruction/parts")
        .and_then(Value::as_array)
        .map(|parts| word_count(&text_of(parts)))
        .unwrap_or(0);
    let mut last_user = None;
    for (i, content) in contents.iter().enumerate() {
        let role = content
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        if role != "user" && role != "model" {
            return Err(Rejected::bad("Please use a valid role: user, model."));
        }
        let parts = content
            .get("parts")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                Rejected::bad(format!(
                    "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
                ))
            })?;
        let mut has_text = false;
        for part in parts {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                prompt_words += word_count(text);
                has_text = true;
            } else if part.get("inlineData").is_some() || part.get("fileData").is_some() {
                has_text = true;
            } else if let Some(call) = part.get("functionCall") {
                if role != "model" || call.get("name").and_then(Value::as_str).is_none() {
                    return Err(Rejected::bad(format!(
                        "* GenerateContentRequest.contents[{i}]: functionCall needs role model and a name"
                    )));
                }
            } else if let Some(response) = part.get("functionResponse") {
                if response.get("name").and_then(Value::as_str).is_none() {
                    return Err(Rejected::bad(format!(
                        "* GenerateContentRequest.contents[{i}].parts.function_response.name: Name cannot be empty."
                    )));
                }
                if !response.get("response").is_some_and(Value::is_object) {
                    return Err(Rejected::bad(format!(
                        "* GenerateContentRequest.contents[{i}].parts.function_response.response: must be an object"
                    )));
                }
                prompt_words += response_words(&response["response"]);
            } else {
                return Err(Rejected::bad(format!(
                    "* GenerateContentRequest.contents[{i}].parts: a part needs data"
                )));
            }
        }
        if role == "user" && has_text {
            last_user = Some(text_of(parts));
        }
    }
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| tool.get("functionDeclarations").and_then(Value::as_array))
        .flatten()
        .filter_map(|f| f.get("name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    Ok(Prompt {
        model,
        stream,
        include_usage: true,
        prompt_words,
        last_user: last_user.unwrap_or_default(),
        tools,
        max_tokens: body
            .pointer("/generationConfig/maxOutputTokens")
            .and_then(Value::as_u64),
        thinking: thinking_asked(body),
        stop_sequences: Vec::new(),
    })
}

/// Whether the request asks for thinking (`generationConfig.thinkingConfig`, its `thinkingBudget`
/// not 0): the answer's first function call then carries a `thoughtSignature`, as Gemini 2.5/3
/// thinking models send it.
fn thinking_asked(body: &Value) -> bool {
    body.pointer("/generationConfig/thinkingConfig")
        .is_some_and(|config| config.get("thinkingBudget").and_then(Value::as_i64) != Some(0))
}

/// The fake's `thoughtSignature` of a function call (the real one is opaque): standard base64
/// with `/`, `+` and padding, as real signatures have.
pub(crate) fn thought_signature_of(call: &Call) -> String {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in call.name.bytes().chain(call.arguments.bytes()) {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fake/thought+sig{state:016x}AA==")
}

fn finish_name(answer: &Answer) -> &'static str {
    match answer {
        Answer::Text {
            finish: Finish::Length,
            ..
        } => "MAX_TOKENS",
        Answer::Text {
            finish: Finish::ContentFilter,
            ..
        } => "SAFETY",
        _ => "STOP",
    }
}

fn usage_json(prompt: u64, completion: Option<u64>) -> Value {
    let mut usage = json!({ "promptTokenCount": prompt,
        "totalTokenCount": prompt + completion.unwrap_or(0),
        "promptTokensDetails": [{ "modality": "TEXT", "tokenCount": prompt }] });
    if let Some(completion) = completion {
        usage["candidatesTokenCount"] = json!(completion);
    }
    usage
}

fn call_part(call: &Call) -> Value {
    let args: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({ "functionCall": { "name": call.name, "args": args } })
}

/// The parts of `calls`; with `signed`, the first carries its `thoughtSignature` (Gemini signs
/// the first function call of a turn, parallel ones come unsigned).
fn call_parts(calls: &[Call], signed: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let mut part = call_part(call);
            if signed && i == 0 {
                part["thoughtSignature"] = json!(thought_signature_of(call));
            }
            part
        })
        .collect()
}

fn candidate(parts: Vec<Value>, finish: Option<&str>) -> Value {
    let mut candidate = json!({ "content": { "parts": parts, "role": "model" }, "index": 0 });
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish);
    }
    candidate
}

fn response(id: &str, model: &str, candidates: Vec<Value>, usage: Value) -> Value {
    json!({ "candidates": candidates, "usageMetadata": usage, "modelVersion": model, "responseId": id })
}

pub(crate) fn response_json(
    id: &str,
    request: &Prompt,
    answer: &Answer,
    prompt: u64,
    completion: u64,
) -> Value {
    let parts = match answer {
        Answer::Text { content, .. } => vec![json!({ "text": content })],
        Answer::ToolCalls(calls) => call_parts(calls, request.thinking),
    };
    response(
        id,
        &request.model,
        vec![candidate(parts, Some(finish_name(answer)))],
        usage_json(prompt, Some(completion)),
    )
}

/// `promptFeedback.blockReason`: the prompt was blocked, there is no candidate (HTTP 200).
pub(crate) fn blocked_json(id: &str, model: &str, prompt: u64) -> Value {
    json!({ "promptFeedback": { "blockReason": "SAFETY", "safetyRatings": [
                { "category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true }] },
            "usageMetadata": usage_json(prompt, None), "modelVersion": model, "responseId": id })
}

pub(crate) fn frame(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\r\n\r\n"))
}

/// Each event is a whole response with the next text piece; the last one carries the finish
/// reason and the full usage. Function calls come whole in one event. No end marker.
pub(crate) fn stream_plan(
    id: &str,
    request: &Prompt,
    answer: &Answer,
    usage: (u64, u64),
    pieces: usize,
) -> StreamPlan {
    let model = request.model.as_str();
    let mut body = Vec::new();
    match answer {
        Answer::Text { content, .. } => {
            let mut texts = split_pieces(content, pieces);
            if texts.is_empty() {
                texts.push(String::new());
            }
            let last = texts.len() - 1;
            for (i, text) in texts.into_iter().enumerate() {
                let finish = (i == last).then(|| finish_name(answer));
                let usage = if i == last {
                    usage_json(usage.0, Some(usage.1))
                } else {
                    usage_json(usage.0, None)
                };
                body.push(frame(&response(
                    id,
                    model,
                    vec![candidate(vec![json!({ "text": text })], finish)],
                    usage,
                )));
            }
        }
        Answer::ToolCalls(calls) => {
            body.push(frame(&response(
                id,
                model,
                vec![candidate(
                    call_parts(calls, request.thinking),
                    Some(finish_name(answer)),
                )],
                usage_json(usage.0, Some(usage.1)),
            )));
        }
    }
    StreamPlan {
        head: Vec::new(),
        body,
        tail: Vec::new(),
        malformed: Bytes::from(format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"unterminated\r\n\r\n{}",
            ""
        )),
    }
}
