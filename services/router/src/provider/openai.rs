//! Translation between `switchboard.chat.v1` and the OpenAI chat-completions wire format.
//!
//! Reasoning output of OpenAI-compatible servers: `reasoning_content` (DeepSeek, vLLM's reasoning
//! parser, SGLang, ...) or `reasoning` (OpenRouter, newer vLLM) on the answer's message becomes one
//! unsigned `Message.thinking` block, and on a stream delta a `ChoiceDelta.thinking` piece of block
//! 0; it never goes into `content`. A server that sends both (vLLM during its rename) sends the
//! same text twice: `reasoning_content` is taken, `reasoning` only when it is absent or empty; a
//! `reasoning` that is not a string is ignored.
//!
//! Refusals: the answer's `message.refusal` (a string, `content` then `null`) is
//! `Message.refusal`, and a stream's `delta.refusal` pieces are `ChoiceDelta.refusal`; an
//! assistant message of the history with a refusal is sent with its `refusal` (next to its
//! `content`, `""` when it has no text: OpenAI requires `content` unless there are tool calls).
//!
//! `SamplingParams.max_tokens` goes in the field the provider takes (see
//! [`MaxTokensField`]): `max_completion_tokens` for OpenAI itself and Azure OpenAI (OpenAI's
//! reasoning models reject `max_tokens`), `max_tokens` for OpenAI-compatible servers, which
//! mostly know only that one.
//!
//! `ChatRequest.thinking.effort` is `reasoning_effort` (OpenAI's reasoning models, and servers
//! that take it); a thinking switch or budget without an effort (Anthropic's) is not sent.
//!
//! Not sent, as chat completions has no field for them: an assistant message's `thinking` blocks
//! (Anthropic's extended thinking, signed for Anthropic only, or reasoning read from a server,
//! which servers do not take back), a tool call's `signature` (Gemini's), `ChatRequest.thinking`,
//! a tool message's `tool_error` flag (the result content goes as is, nothing prefixed) and
//! `SamplingParams.top_k` — except to OpenAI-compatible servers (vLLM, Ollama, ...), which take
//! `top_k` as an extension: the provider client adds it for an `openai` provider whose `base_url`
//! is not OpenAI's own (see `ProviderClient::prepare`). It is never an error.
//!
//! Per endpoint (`ProviderClient::prepare`): a `developer` message goes as `developer` only to
//! OpenAI itself and to Azure api-versions from 2024-12-01-preview; OpenAI-compatible servers
//! (DeepSeek, DeepInfra, vLLM, ...) and older Azure api-versions reject that role, and get
//! `system`. `stream_options` (usage at the end of a stream) is not sent to Azure api-versions
//! before 2024-09-01-preview, which reject it: those streams carry no usage.
//!
//! Finish reasons: `"stop"` on a choice with tool calls (OpenAI's answer to a named tool choice,
//! unary and streamed) is `FINISH_REASON_TOOL_CALLS`, as for Gemini.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_proto::chat::v1::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, ContentPart, FinishReason, Message,
    ResponseFormatType, Role, ThinkingBlock, ThinkingDelta, ToolCall, ToolCallDelta,
    ToolChoiceMode, Usage, content_part::Part, tool_choice::Choice as ToolChoiceKind,
};

use super::{Decoded, ProviderError, StreamDecoder, sse::SseEvent};
use crate::config::MaxTokensField;

/// A request that cannot be expressed (bad JSON text in a schema, unspecified role, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct TranslateError {
    /// Path of the bad field in the request.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> TranslateError {
    TranslateError {
        field: field.into(),
        message: message.into(),
    }
}

fn role_name(role: i32, field: &str) -> Result<&'static str, TranslateError> {
    match Role::try_from(role) {
        Ok(Role::System) => Ok("system"),
        Ok(Role::User) => Ok("user"),
        Ok(Role::Assistant) => Ok("assistant"),
        Ok(Role::Tool) => Ok("tool"),
        Ok(Role::Developer) => Ok("developer"),
        Ok(Role::Unspecified) | Err(_) => Err(invalid(field, "role must be set")),
    }
}

pub(crate) fn parse_json_text(text: &str, field: &str) -> Result<Value, TranslateError> {
    serde_json::from_str(text).map_err(|e| invalid(field, format!("not valid JSON: {e}")))
}

/// Tool-call arguments as a JSON value (providers that take an object, not a string): empty text is `{}`.
pub(crate) fn tool_arguments(text: &str, field: &str) -> Result<Value, TranslateError> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    parse_json_text(text, field)
}

/// A message's content parts in a provider's shape: `text` for each non-empty text part (empty ones
/// are dropped: providers reject them), `image` for each image URL (given its field path).
pub(crate) fn content_values(
    message: &Message,
    field: &str,
    text: impl Fn(&str) -> Value,
    image: impl Fn(&str, &str) -> Result<Value, TranslateError>,
) -> Result<Vec<Value>, TranslateError> {
    let mut values = Vec::new();
    for (i, part) in message.content.iter().enumerate() {
        match &part.part {
            Some(Part::Text(t)) if t.is_empty() => {}
            Some(Part::Text(t)) => values.push(text(t)),
            Some(Part::ImageUrl(img)) => {
                values.push(image(&img.url, &format!("{field}.content[{i}]"))?);
            }
            None => {}
        }
    }
    Ok(values)
}

fn content_json(message: &Message) -> Value {
    let only_text = message
        .content
        .iter()
        .all(|p| matches!(p.part, Some(Part::Text(_))));
    if message.content.is_empty() {
        return if message.tool_calls.is_empty() {
            json!("")
        } else {
            Value::Null
        };
    }
    if only_text && message.content.len() == 1 {
        return json!(message.joined_text());
    }
    let parts: Vec<Value> = message
        .content
        .iter()
        .filter_map(|part| match &part.part {
            Some(Part::Text(text)) => Some(json!({ "type": "text", "text": text })),
            Some(Part::ImageUrl(image)) => {
                let mut url = Map::new();
                url.insert("url".into(), json!(image.url));
                if !image.detail.is_empty() {
                    url.insert("detail".into(), json!(image.detail));
                }
                Some(json!({ "type": "image_url", "image_url": url }))
            }
            None => None,
        })
        .collect();
    Value::Array(parts)
}

/// The OpenAI request body for `request` sent to provider model `model`, the output-token limit
/// in `max_tokens_field`. `tags` are never sent.
pub fn to_openai_request(
    model: &str,
    request: &ChatRequest,
    stream: bool,
    max_tokens_field: MaxTokensField,
) -> Result<Value, TranslateError> {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.iter().enumerate() {
        let mut out = Map::new();
        out.insert(
            "role".into(),
            json!(role_name(message.role, &format!("messages[{i}].role"))?),
        );
        out.insert("content".into(), content_json(message));
        if !message.name.is_empty() {
            out.insert("name".into(), json!(message.name));
        }
        if !message.tool_calls.is_empty() {
            let calls: Vec<Value> = message
                .tool_calls
                .iter()
                .map(|call| {
                    json!({ "id": call.id, "type": "function",
                            "function": { "name": call.name, "arguments": call.arguments_json } })
                })
                .collect();
            out.insert("tool_calls".into(), Value::Array(calls));
        }
        if !message.tool_call_id.is_empty() {
            out.insert("tool_call_id".into(), json!(message.tool_call_id));
        }
        if !message.refusal.is_empty() {
            out.insert("refusal".into(), json!(message.refusal));
        }
        messages.push(Value::Object(out));
    }
    body.insert("messages".into(), Value::Array(messages));

    if !request.tools.is_empty() {
        let mut tools = Vec::with_capacity(request.tools.len());
        for (i, tool) in request.tools.iter().enumerate() {
            let mut function = Map::new();
            function.insert("name".into(), json!(tool.name));
            if !tool.description.is_empty() {
                function.insert("description".into(), json!(tool.description));
            }
            if !tool.parameters_json.trim().is_empty() {
                function.insert(
                    "parameters".into(),
                    parse_json_text(
                        &tool.parameters_json,
                        &format!("tools[{i}].parameters_json"),
                    )?,
                );
            }
            if tool.strict {
                function.insert("strict".into(), json!(true));
            }
            tools.push(json!({ "type": "function", "function": function }));
        }
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = request.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
        let value = match choice {
            ToolChoiceKind::Mode(mode) => match ToolChoiceMode::try_from(*mode) {
                Ok(ToolChoiceMode::None) => Some(json!("none")),
                Ok(ToolChoiceMode::Auto) => Some(json!("auto")),
                Ok(ToolChoiceMode::Required) => Some(json!("required")),
                Ok(ToolChoiceMode::Unspecified) | Err(_) => None,
            },
            ToolChoiceKind::FunctionName(name) => {
                Some(json!({ "type": "function", "function": { "name": name } }))
            }
        };
        if let Some(value) = value {
            body.insert("tool_choice".into(), value);
        }
    }
    if let Some(parallel) = request.parallel_tool_calls {
        body.insert("parallel_tool_calls".into(), json!(parallel));
    }
    if let Some(format) = &request.response_format {
        let value = match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::Text) => Some(json!({ "type": "text" })),
            Ok(ResponseFormatType::JsonObject) => Some(json!({ "type": "json_object" })),
            Ok(ResponseFormatType::JsonSchema) => {
                let mut schema = Map::new();
                schema.insert("name".into(), json!(format.schema_name));
                if !format.json_schema_json.trim().is_empty() {
                    schema.insert(
                        "schema".into(),
                        parse_json_text(
                            &format.json_schema_json,
                            "response_format.json_schema_json",
                        )?,
                    );
                }
                if format.strict {
                    schema.insert("strict".into(), json!(true));
                }
                Some(json!({ "type": "json_schema", "json_schema": schema }))
            }
            Ok(ResponseFormatType::Unspecified) | Err(_) => None,
        };
        if let Some(value) = value {
            body.insert("response_format".into(), value);
        }
    }
    if let Some(sampling) = &request.sampling {
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                body.insert(key.into(), value);
            }
        };
        put("temperature", sampling.temperature.map(|v| json!(v)));
        put("top_p", sampling.top_p.map(|v| json!(v)));
        put(
            max_tokens_field.name(),
            sampling.max_tokens.map(|v| json!(v)),
        );
        put(
            "stop",
            (!sampling.stop.is_empty()).then(|| json!(sampling.stop)),
        );
        put(
            "presence_penalty",
            sampling.presence_penalty.map(|v| json!(v)),
        );
        put(
            "frequency_penalty",
            sampling.frequency_penalty.map(|v| json!(v)),
        );
        put("seed", sampling.seed.map(|v| json!(v)));
        put("n", sampling.n.map(|v| json!(v)));
    }
    if !request.user.is_empty() {
        body.insert("user".into(), json!(request.user));
    }
    if let Some(thinking) = request.thinking.as_ref().filter(|t| !t.effort.is_empty()) {
        body.insert("reasoning_effort".into(), json!(thinking.effort));
    }
    if stream {
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    Ok(Value::Object(body))
}

// === responses ===

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: Option<OaPromptDetails>,
    completion_tokens_details: Option<OaCompletionDetails>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaPromptDetails {
    cached_tokens: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaCompletionDetails {
    reasoning_tokens: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaToolCall {
    index: Option<u32>,
    id: Option<String>,
    function: Option<OaFunction>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaMessage {
    role: Option<String>,
    content: Option<Value>,
    tool_calls: Option<Vec<OaToolCall>>,
    /// Reasoning text of DeepSeek, vLLM, SGLang and others.
    reasoning_content: Option<String>,
    /// Reasoning text of OpenRouter and newer vLLM. Taken only as a string: the name is generic
    /// enough that a server may use it for something else.
    reasoning: Option<Value>,
    /// The model's refusal (`null` when it did not refuse).
    refusal: Option<String>,
}

impl OaMessage {
    /// The reasoning text (empty when there is none): `reasoning_content`, else `reasoning`.
    fn take_reasoning(&mut self) -> String {
        match self.reasoning_content.take() {
            Some(text) if !text.is_empty() => text,
            _ => match self.reasoning.take() {
                Some(Value::String(text)) => text,
                _ => String::new(),
            },
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaChoice {
    index: u32,
    message: Option<OaMessage>,
    delta: Option<OaMessage>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct OaCompletion {
    id: String,
    model: String,
    created: i64,
    choices: Vec<OaChoice>,
    usage: Option<OaUsage>,
    error: Option<Value>,
}

/// A provider answer that does not follow the wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed provider response: {0}")]
pub struct ParseError(pub String);

fn usage(usage: Option<OaUsage>) -> Option<Usage> {
    usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: if u.total_tokens == 0 {
            u.prompt_tokens + u.completion_tokens
        } else {
            u.total_tokens
        },
        cached_prompt_tokens: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
        reasoning_tokens: u
            .completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0),
        cache_write_tokens: 0,
    })
}

/// A choice that called tools finished for them: OpenAI ends a named `tool_choice`'s call with
/// `"stop"` (unary and streamed), which is `FINISH_REASON_TOOL_CALLS` here, as Gemini's `STOP`
/// with function calls is.
fn with_calls(reason: FinishReason, calls: bool) -> FinishReason {
    if calls && reason == FinishReason::Stop {
        FinishReason::ToolCalls
    } else {
        reason
    }
}

/// Maps an OpenAI finish reason.
pub fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        Some("content_filter") => FinishReason::ContentFilter,
        _ => FinishReason::Unspecified,
    }
}

fn role(role: Option<&str>) -> Role {
    match role {
        Some("system") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        Some("developer") => Role::Developer,
        _ => Role::Unspecified,
    }
}

fn content_parts(content: Option<&Value>) -> Vec<ContentPart> {
    match content {
        Some(Value::String(text)) if !text.is_empty() => vec![ContentPart {
            part: Some(Part::Text(text.clone())),
        }],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|text| ContentPart {
                part: Some(Part::Text(text.to_owned())),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn error_message(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| error.to_string())
}

fn parse(body: &[u8]) -> Result<OaCompletion, ParseError> {
    checked(serde_json::from_slice(body).map_err(|e| ParseError(e.to_string()))?)
}

/// [`parse`] of text already known to be UTF-8 (a stream's event): `from_str` skips the UTF-8
/// check `from_slice` makes on every key and string (16 per chunk, a stream's largest decoding
/// cost after the parse itself).
fn parse_text(text: &str) -> Result<OaCompletion, ParseError> {
    checked(serde_json::from_str(text).map_err(|e| ParseError(e.to_string()))?)
}

fn checked(completion: OaCompletion) -> Result<OaCompletion, ParseError> {
    if let Some(error) = &completion.error {
        return Err(ParseError(format!(
            "provider error: {}",
            error_message(error)
        )));
    }
    Ok(completion)
}

/// Parses a `chat.completion` object.
pub fn from_openai_response(body: &[u8]) -> Result<ChatResponse, ParseError> {
    let completion = parse(body)?;
    if completion.choices.is_empty() {
        return Err(ParseError("no choices".to_owned()));
    }
    let choices = completion
        .choices
        .into_iter()
        .map(|choice| {
            let mut message = choice.message.unwrap_or_default();
            let reasoning = message.take_reasoning();
            let tool_calls: Vec<ToolCall> = message
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|call| {
                    let function = call.function.unwrap_or_default();
                    ToolCall {
                        id: call.id.unwrap_or_default(),
                        name: function.name.unwrap_or_default(),
                        arguments_json: function.arguments.unwrap_or_default(),
                        signature: String::new(),
                    }
                })
                .collect();
            let finish = with_calls(
                finish_reason(choice.finish_reason.as_deref()),
                !tool_calls.is_empty(),
            );
            Choice {
                index: choice.index,
                message: Some(Message {
                    role: role(message.role.as_deref().or(Some("assistant"))) as i32,
                    content: content_parts(message.content.as_ref()),
                    tool_calls,
                    thinking: if reasoning.is_empty() {
                        Vec::new()
                    } else {
                        vec![ThinkingBlock {
                            text: reasoning,
                            ..Default::default()
                        }]
                    },
                    refusal: message.refusal.unwrap_or_default(),
                    ..Default::default()
                }),
                finish_reason: finish as i32,
            }
        })
        .collect();
    Ok(ChatResponse {
        id: completion.id,
        model: completion.model,
        choices,
        usage: usage(completion.usage),
        created: completion.created,
    })
}

/// Parses one `chat.completion.chunk` (the `data:` of one SSE event other than `[DONE]`).
pub fn from_openai_chunk(data: &str) -> Result<ChatChunk, ParseError> {
    let chunk = parse_text(data)?;
    let choices = chunk
        .choices
        .into_iter()
        .map(|choice| {
            let mut delta = choice.delta.unwrap_or_default();
            let reasoning = delta.take_reasoning();
            ChoiceDelta {
                index: choice.index,
                role: role(delta.role.as_deref()) as i32,
                content: match delta.content {
                    Some(Value::String(text)) => text,
                    _ => String::new(),
                },
                tool_calls: delta
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(position, call)| {
                        let function = call.function.unwrap_or_default();
                        ToolCallDelta {
                            index: call.index.unwrap_or(position as u32),
                            id: call.id.unwrap_or_default(),
                            name: function.name.unwrap_or_default(),
                            arguments_delta: function.arguments.unwrap_or_default(),
                            signature: String::new(),
                        }
                    })
                    .collect(),
                finish_reason: finish_reason(choice.finish_reason.as_deref()) as i32,
                thinking: if reasoning.is_empty() {
                    Vec::new()
                } else {
                    vec![ThinkingDelta {
                        index: 0,
                        text: reasoning,
                        ..Default::default()
                    }]
                },
                refusal: delta.refusal.unwrap_or_default(),
                ..Default::default()
            }
        })
        .collect();
    Ok(ChatChunk {
        id: chunk.id,
        model: chunk.model,
        choices,
        usage: usage(chunk.usage),
        created: chunk.created,
    })
}

/// Parses a successful unary answer; an error object in it is mapped to the taxonomy.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, ProviderError> {
    from_openai_response(body).map_err(|e| provider_error(body, e))
}

/// Why a body did not parse as a completion: the provider's error object when it is one (mapped to
/// the taxonomy), else a protocol error. Bodies are parsed once, as the typed completion; only one
/// that fails that is looked at again as generic JSON.
fn provider_error(body: &[u8], error: ParseError) -> ProviderError {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if value.get("error").is_some_and(|e| !e.is_null()) => {
            ProviderError::from_error_value(&value)
        }
        _ => ProviderError::Protocol(error.to_string()),
    }
}

/// Decodes OpenAI (and Azure OpenAI) chat-completion streams: one `chat.completion.chunk` per
/// event, ended by `data: [DONE]`. Chunks with neither choices nor usage (Azure's opening
/// `prompt_filter_results`) are skipped; an `{"error":…}` event is mapped to the taxonomy. A
/// choice that streamed tool-call deltas and finishes with `"stop"` finishes with tool calls.
#[derive(Debug, Default)]
pub struct OpenaiDecoder {
    /// Indexes of the choices that streamed tool-call deltas so far.
    calling: std::collections::BTreeSet<u32>,
}

impl StreamDecoder for OpenaiDecoder {
    fn event(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Decoded {
                chunks: Vec::new(),
                done: true,
            });
        }
        let mut chunk = from_openai_chunk(data).map_err(|e| provider_error(data.as_bytes(), e))?;
        for choice in &mut chunk.choices {
            if !choice.tool_calls.is_empty() {
                self.calling.insert(choice.index);
            }
            if let Ok(reason) = FinishReason::try_from(choice.finish_reason) {
                choice.finish_reason =
                    with_calls(reason, self.calling.contains(&choice.index)) as i32;
            }
        }
        let chunks = if chunk.choices.is_empty() && chunk.usage.is_none() {
            Vec::new()
        } else {
            vec![chunk]
        };
        Ok(Decoded {
            chunks,
            done: false,
        })
    }

    fn end_of_body(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        Err(ProviderError::Interrupted(
            "stream ended without [DONE]".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::HashMap;
    use switchboard_proto::chat::v1::{
        ImageUrl, ResponseFormat, SamplingParams, ThinkingConfig, Tool, ToolChoice,
    };

    fn full_request() -> ChatRequest {
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.content.clear();
        assistant.tool_calls = vec![ToolCall {
            id: "call_9".into(),
            name: "lookup".into(),
            arguments_json: "{\"q\":1}".into(),
            signature: String::new(),
        }];
        let mut tool = Message::text(Role::Tool, "42");
        tool.tool_call_id = "call_9".into();
        let mut user = Message::text(Role::User, "what is this?");
        user.name = "ann".into();
        user.content.push(ContentPart {
            part: Some(Part::ImageUrl(ImageUrl {
                url: "https://x/img.png".into(),
                detail: "low".into(),
            })),
        });
        ChatRequest {
            model: "route".into(),
            messages: vec![
                Message::text(Role::System, "be brief"),
                user,
                assistant,
                tool,
            ],
            tools: vec![Tool {
                name: "lookup".into(),
                description: "looks up".into(),
                parameters_json: "{\"type\":\"object\"}".into(),
                strict: true,
            }],
            tool_choice: Some(ToolChoice {
                choice: Some(ToolChoiceKind::FunctionName("lookup".into())),
            }),
            sampling: Some(SamplingParams {
                temperature: Some(0.5),
                top_p: None,
                max_tokens: Some(100),
                stop: vec!["END".into()],
                presence_penalty: None,
                frequency_penalty: Some(0.25),
                seed: Some(7),
                n: Some(1),
                top_k: Some(40),
            }),
            response_format: Some(ResponseFormat {
                r#type: ResponseFormatType::JsonSchema as i32,
                schema_name: "answer".into(),
                json_schema_json: "{\"type\":\"object\"}".into(),
                strict: true,
            }),
            parallel_tool_calls: Some(false),
            user: "user-1".into(),
            tags: HashMap::from([("team".into(), "secret-team".into())]),
            thinking: Some(ThinkingConfig {
                enabled: true,
                budget_tokens: 2048,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn request_translates_every_field() {
        let body =
            to_openai_request("gpt-x", &full_request(), false, MaxTokensField::MaxTokens).unwrap();
        let expected = json!({
            "model": "gpt-x",
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "name": "ann", "content": [
                    { "type": "text", "text": "what is this?" },
                    { "type": "image_url", "image_url": { "url": "https://x/img.png", "detail": "low" } },
                ] },
                { "role": "assistant", "content": null, "tool_calls": [
                    { "id": "call_9", "type": "function", "function": { "name": "lookup", "arguments": "{\"q\":1}" } },
                ] },
                { "role": "tool", "content": "42", "tool_call_id": "call_9" },
            ],
            "tools": [{ "type": "function", "function": {
                "name": "lookup", "description": "looks up", "parameters": { "type": "object" }, "strict": true } }],
            "tool_choice": { "type": "function", "function": { "name": "lookup" } },
            "parallel_tool_calls": false,
            "response_format": { "type": "json_schema", "json_schema": {
                "name": "answer", "schema": { "type": "object" }, "strict": true } },
            "temperature": 0.5,
            "max_tokens": 100,
            "stop": ["END"],
            "frequency_penalty": 0.25,
            "seed": 7,
            "n": 1,
            "user": "user-1",
        });
        assert_eq!(body, expected);
        assert!(!body.to_string().contains("secret-team"));
    }

    #[test]
    fn the_limit_goes_in_the_providers_field_and_only_there() {
        let body = to_openai_request(
            "o3",
            &full_request(),
            false,
            MaxTokensField::MaxCompletionTokens,
        )
        .unwrap();
        assert_eq!(body["max_completion_tokens"], 100);
        assert!(body.get("max_tokens").is_none(), "{body}");
        let body =
            to_openai_request("llama", &full_request(), false, MaxTokensField::MaxTokens).unwrap();
        assert_eq!(body["max_tokens"], 100);
        assert!(body.get("max_completion_tokens").is_none(), "{body}");
        // No limit asked: neither field.
        let mut request = full_request();
        request.sampling.as_mut().unwrap().max_tokens = None;
        let body =
            to_openai_request("o3", &request, false, MaxTokensField::MaxCompletionTokens).unwrap();
        assert!(body.get("max_completion_tokens").is_none() && body.get("max_tokens").is_none());
    }

    #[test]
    fn stream_requests_ask_for_usage() {
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            tool_choice: Some(ToolChoice {
                choice: Some(ToolChoiceKind::Mode(ToolChoiceMode::Required as i32)),
            }),
            ..Default::default()
        };
        let body = to_openai_request("m", &request, true, MaxTokensField::MaxTokens).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"], json!({ "include_usage": true }));
        assert_eq!(body["tool_choice"], "required");
        assert!(body.get("tools").is_none());
    }

    #[test]
    fn bad_requests_name_the_field() {
        let mut request = full_request();
        request.tools[0].parameters_json = "{nope".into();
        let error = to_openai_request("m", &request, false, MaxTokensField::MaxTokens).unwrap_err();
        assert_eq!(error.field, "tools[0].parameters_json");
        let mut request = full_request();
        request.messages[1].role = Role::Unspecified as i32;
        assert_eq!(
            to_openai_request("m", &request, false, MaxTokensField::MaxTokens)
                .unwrap_err()
                .field,
            "messages[1].role"
        );
    }

    #[test]
    fn response_translates_tool_calls_and_usage_details() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-x",
            "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "f", "arguments": "{}" } }] } }],
            "usage": { "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "prompt_tokens_details": { "cached_tokens": 4 }, "completion_tokens_details": { "reasoning_tokens": 2 } },
        });
        let response = from_openai_response(body.to_string().as_bytes()).unwrap();
        assert_eq!(response.id, "chatcmpl-1");
        assert_eq!(response.model, "gpt-x");
        assert_eq!(response.created, 1_700_000_000);
        let choice = &response.choices[0];
        assert_eq!(choice.finish_reason, FinishReason::ToolCalls as i32);
        let message = choice.message.as_ref().unwrap();
        assert_eq!(message.role, Role::Assistant as i32);
        assert!(message.content.is_empty());
        assert_eq!(
            message.tool_calls,
            vec![ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments_json: "{}".into(),
                signature: String::new(),
            }]
        );
        assert_eq!(
            response.usage.unwrap(),
            Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cached_prompt_tokens: 4,
                reasoning_tokens: 2,
                cache_write_tokens: 0
            }
        );
        let text = json!({ "id": "x", "model": "m", "created": 1, "choices": [{ "index": 0, "finish_reason": "length",
            "message": { "role": "assistant", "content": "hello" } }] });
        let response = from_openai_response(text.to_string().as_bytes()).unwrap();
        assert_eq!(
            response.choices[0].message.as_ref().unwrap().joined_text(),
            "hello"
        );
        assert_eq!(
            response.choices[0].finish_reason,
            FinishReason::Length as i32
        );
        assert!(response.usage.is_none());
        assert!(from_openai_response(b"{\"choices\": []}").is_err());
        assert!(from_openai_response(b"not json").is_err());
    }

    #[test]
    fn chunks_translate_deltas_finish_and_usage() {
        let chunk = from_openai_chunk(
            r#"{"id":"c","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(chunk.choices[0].role, Role::Assistant as i32);
        assert_eq!(chunk.choices[0].content, "hi");
        assert_eq!(
            chunk.choices[0].finish_reason,
            FinishReason::Unspecified as i32
        );
        let chunk = from_openai_chunk(
            r#"{"id":"c","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            chunk.choices[0].tool_calls,
            vec![ToolCallDelta {
                index: 1,
                id: "call_1".into(),
                name: "f".into(),
                arguments_delta: String::new(),
                signature: String::new(),
            }]
        );
        let chunk =
            from_openai_chunk(r#"{"id":"c","created":5,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#)
                .unwrap();
        assert_eq!(chunk.choices[0].finish_reason, FinishReason::Stop as i32);
        let chunk = from_openai_chunk(
            r#"{"id":"c","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        )
        .unwrap();
        assert!(chunk.choices.is_empty());
        assert_eq!(chunk.usage.unwrap().total_tokens, 5);
        assert!(
            from_openai_chunk(r#"{"error":{"message":"overloaded"}}"#)
                .unwrap_err()
                .0
                .contains("overloaded")
        );
    }

    #[test]
    fn error_objects_map_to_the_taxonomy_whatever_else_the_body_holds() {
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        let mut decoder = OpenaiDecoder::default();
        // An error event mid-stream, alone or with fields that do not fit a chunk's shape.
        for data in [
            r#"{"error":{"message":"Overloaded","type":"overloaded_error"}}"#,
            r#"{"choices":"none","error":{"message":"Overloaded","type":"overloaded_error"}}"#,
        ] {
            assert!(
                matches!(
                    decoder.event(&event(data)),
                    Err(ProviderError::Overloaded { status: 529, .. })
                ),
                "{data}"
            );
        }
        assert!(matches!(
            decoder.event(&event(r#"{"error":{"message":"slow down","code":429}}"#)),
            Err(ProviderError::RateLimited { status: 429, .. })
        ));
        // Neither a chunk nor an error object: a protocol error; `"error": null` is no error.
        assert!(matches!(
            decoder.event(&event(r#"{"choices":"none"}"#)),
            Err(ProviderError::Protocol(_))
        ));
        let decoded = decoder
            .event(&event(
                r#"{"id":"c","model":"m","error":null,"choices":[{"index":0,"delta":{"content":"hi"}}]}"#,
            ))
            .unwrap();
        assert_eq!(decoded.chunks[0].choices[0].content, "hi");
        // The same for a unary answer.
        assert!(matches!(
            parse_response(br#"{"error":{"message":"boom","type":"server_error"}}"#),
            Err(ProviderError::Upstream { status: 500, .. })
        ));
        assert!(matches!(
            parse_response(br#"{"choices":[{"index":0,"message":{"content":"x"}}],"error":{"message":"no","type":"invalid_request_error"}}"#),
            Err(ProviderError::BadRequest { status: 400, .. })
        ));
        assert!(matches!(
            parse_response(br#"{"choices":7}"#),
            Err(ProviderError::Protocol(_))
        ));
        assert_eq!(
            parse_response(br#"{"choices":[{"index":0,"message":{"content":"x"}}],"error":null}"#)
                .unwrap()
                .choices[0]
                .message
                .as_ref()
                .unwrap()
                .joined_text(),
            "x"
        );
    }

    #[test]
    fn a_stop_with_tool_calls_is_a_tool_calls_finish() {
        // OpenAI finishes a named tool choice's call with "stop" (unary and streamed).
        let body = br#"{"id":"c","model":"gpt-4o","created":1,"choices":[{"index":0,"finish_reason":"stop",
            "message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
            "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]}}]}"#;
        let response = parse_response(body).unwrap();
        assert_eq!(
            response.choices[0].finish_reason,
            FinishReason::ToolCalls as i32
        );
        // Without calls, a stop is a stop.
        let text = br#"{"id":"c","model":"gpt-4o","created":1,"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"hi","tool_calls":[]}}]}"#;
        assert_eq!(
            parse_response(text).unwrap().choices[0].finish_reason,
            FinishReason::Stop as i32
        );

        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        let finishes = |events: &[&str]| {
            let mut decoder = OpenaiDecoder::default();
            events
                .iter()
                .flat_map(|data| decoder.event(&event(data)).unwrap().chunks)
                .flat_map(|chunk| chunk.choices)
                .filter(|choice| choice.finish_reason != 0)
                .map(|choice| (choice.index, choice.finish_reason))
                .collect::<Vec<_>>()
        };
        let call = |index: u32| {
            format!(
                r#"{{"id":"c","model":"m","choices":[{{"index":{index},"delta":{{"tool_calls":[{{"index":0,"id":"call_{index}","type":"function","function":{{"name":"f","arguments":"{{}}"}}}}]}},"finish_reason":null}}]}}"#
            )
        };
        let stop = |index: u32| {
            format!(
                r#"{{"id":"c","model":"m","choices":[{{"index":{index},"delta":{{}},"finish_reason":"stop"}}]}}"#
            )
        };
        let text = r#"{"id":"c","model":"m","choices":[{"index":1,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        // Choice 0 called a tool, choice 1 answered text: only choice 0's stop becomes tool_calls.
        assert_eq!(
            finishes(&[&call(0), text, &stop(0), &stop(1)]),
            vec![
                (0, FinishReason::ToolCalls as i32),
                (1, FinishReason::Stop as i32)
            ]
        );
        // A stop in the same chunk as the call.
        let together = r#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_0","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}]}"#;
        assert_eq!(
            finishes(&[together]),
            vec![(0, FinishReason::ToolCalls as i32)]
        );
    }

    fn thinking_of(body: Value) -> (Vec<ThinkingBlock>, String) {
        let response = from_openai_response(body.to_string().as_bytes()).unwrap();
        let message = response.choices[0].message.clone().unwrap();
        let text = message.joined_text();
        (message.thinking, text)
    }

    #[test]
    fn response_reasoning_becomes_one_unsigned_thinking_block() {
        let answer = |message: Value| {
            json!({ "id": "x", "model": "deepseek-reasoner", "created": 1,
                "choices": [{ "index": 0, "finish_reason": "stop", "message": message }] })
        };
        let block = |text: &str| ThinkingBlock {
            text: text.into(),
            ..Default::default()
        };
        // DeepSeek / vLLM: `reasoning_content` next to `content`.
        let (thinking, content) = thinking_of(answer(json!({ "role": "assistant",
            "reasoning_content": "9.8 is 9.80, larger.", "content": "9.8 is greater." })));
        assert_eq!(thinking, vec![block("9.8 is 9.80, larger.")]);
        assert_eq!(content, "9.8 is greater.");
        // OpenRouter: `reasoning`.
        let (thinking, content) = thinking_of(answer(
            json!({ "role": "assistant", "reasoning": "compare digits", "content": "9.8" }),
        ));
        assert_eq!(thinking, vec![block("compare digits")]);
        assert_eq!(content, "9.8");
        // Both (vLLM during its rename): the same text, taken once.
        let (thinking, _) = thinking_of(answer(json!({ "role": "assistant",
            "reasoning_content": "same", "reasoning": "same", "content": "a" })));
        assert_eq!(thinking, vec![block("same")]);
        let (thinking, _) = thinking_of(answer(json!({ "role": "assistant",
            "reasoning_content": "", "reasoning": "fallback", "content": "a" })));
        assert_eq!(thinking, vec![block("fallback")]);
        // Absent, null, empty or not text: no block.
        for message in [
            json!({ "role": "assistant", "content": "a" }),
            json!({ "role": "assistant", "content": "a", "reasoning_content": null, "reasoning": null }),
            json!({ "role": "assistant", "content": "a", "reasoning_content": "" }),
            json!({ "role": "assistant", "content": "a", "reasoning": { "effort": "high" } }),
        ] {
            let (thinking, content) = thinking_of(answer(message.clone()));
            assert!(thinking.is_empty(), "{message}");
            assert_eq!(content, "a", "{message}");
        }
        // A reasoning-only answer (cut by max_tokens) has thinking and no content.
        let (thinking, content) = thinking_of(answer(
            json!({ "role": "assistant", "reasoning_content": "long", "content": null }),
        ));
        assert_eq!(thinking, vec![block("long")]);
        assert_eq!(content, "");
        // Reasoning of the wrong type is malformed, like any other field.
        assert!(
            from_openai_response(
                answer(json!({ "role": "assistant", "reasoning_content": 5 }))
                    .to_string()
                    .as_bytes()
            )
            .is_err()
        );
    }

    #[test]
    fn chunk_reasoning_becomes_thinking_pieces_of_block_zero() {
        let delta = |delta: &str| {
            from_openai_chunk(&format!(
                r#"{{"id":"c","created":5,"model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":null}}]}}"#
            ))
            .unwrap()
            .choices
            .remove(0)
        };
        let piece = |text: &str| {
            vec![ThinkingDelta {
                index: 0,
                text: text.into(),
                ..Default::default()
            }]
        };
        let first = delta(r#"{"role":"assistant","content":null,"reasoning_content":""}"#);
        assert_eq!(first.role, Role::Assistant as i32);
        assert!(first.thinking.is_empty());
        let reasoning = delta(r#"{"content":null,"reasoning_content":"Okay, "}"#);
        assert_eq!(reasoning.thinking, piece("Okay, "));
        assert_eq!(reasoning.content, "");
        let reasoning = delta(r#"{"reasoning":"so"}"#);
        assert_eq!(reasoning.thinking, piece("so"));
        let reasoning = delta(r#"{"reasoning_content":"x","reasoning":"x"}"#);
        assert_eq!(reasoning.thinking, piece("x"));
        let answer = delta(r#"{"content":"9.8","reasoning_content":null}"#);
        assert!(answer.thinking.is_empty());
        assert_eq!(answer.content, "9.8");
    }
}
