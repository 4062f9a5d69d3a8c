//! The OpenAI chat-completions wire format at the front door, and its translation to and from the
//! provider-neutral protobuf model.
//!
//! Extensions beyond OpenAI's format, as OpenAI-compatible servers have them: `top_k` in the
//! request (vLLM, Ollama; passed on to providers that take it, dropped for OpenAI itself), and
//! the model's reasoning (`Message.thinking`, Anthropic's extended thinking) as
//! `reasoning_content` on the answer's message and on stream deltas, never in `content`.
//! A Gemini thought signature on a tool call (`ToolCall.signature`) rides in the call's id
//! (`<id>__thought__<signature>`, see [`crate::tool_id`]): shown in `tool_calls[].id` and in the
//! stream delta that carries the id, split again from an assistant message's `tool_calls[].id`
//! and a tool message's `tool_call_id`. Other signatures (Anthropic's thinking) and redacted
//! reasoning have no place here and are not shown; a stop sequence is
//! finish reason `stop`. `reasoning_effort` (`none`, `minimal`, `low`, `medium`, `high`; anything
//! else is a 400 naming the field) is `ChatRequest.thinking.effort`: passed to OpenAI as is, and a
//! thinking budget for Anthropic and Gemini.
//!
//! Refusals (`Message.refusal`) are OpenAI's: the answer's `message.refusal` (`null` when the model
//! did not refuse; `content` is then `null` when there is no text), stream deltas' `refusal`
//! pieces, and an assistant message's `refusal` in the request's history.
//!
//! Clients: `null` in an optional field is the field absent, as OpenAI takes it (Python's
//! `model_dump()` of an answer's message sends `"tool_calls": null`, `"audio": null`, …).
//! Parameters asking for what Switchboard does not have (`logprobs`, `top_logprobs`, legacy
//! `functions` / `function_call` and `role: "function"` messages, audio `modalities` / `audio`,
//! `web_search_options`, a non-empty `logit_bias`) are a 400 naming them, never silently
//! dropped; their neutral values pass.
//! `finish_reason` is always one of OpenAI's values (never `null` in an answer); one that is only
//! the closest (a provider error is `length`) has the neutral reason in `switchboard.finish_detail`
//! (see `finish_reason_out`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_proto::chat::v1 as pb;

use crate::{error::GatewayError, tool_id};

// === request ===

/// `POST /v1/chat/completions` body. Unknown fields are ignored, as OpenAI's own SDKs send new ones first.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tools: Vec<RequestTool>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub response_format: Option<RequestResponseFormat>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Extension (vLLM, Ollama): top-k sampling.
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Reasoning models: `none`, `minimal`, `low`, `medium` or `high`.
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    // Parameters asking for what Switchboard cannot give, read only to refuse them: see
    // `refuse_unsupported`.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    /// Legacy function calling (`tools` replaced it).
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    /// Audio output.
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    /// Built-in web search of OpenAI's search models.
    #[serde(default)]
    web_search_options: Option<Value>,
    /// Token biases: token ids of one tokenizer, which the proto does not carry to any provider.
    #[serde(default)]
    logit_bias: Option<Value>,
}

impl ChatCompletionRequest {
    /// Refuses a parameter asking for what Switchboard cannot give (400 `invalid_request_error`
    /// naming it, like an unsupported tool type) rather than answering without it, which would
    /// mislead the caller (asked for logprobs, got none). Neutral values (`null`, `logprobs:
    /// false`, `top_logprobs: 0`, `modalities: ["text"]`, `functions: []`, `function_call:
    /// "none"` or `"auto"`), which SDKs and hand-built dicts send as defaults, are accepted.
    ///
    /// Hints about how (not what) the provider answers are ignored, as unknown fields are:
    /// `prediction` (predicted outputs only speed up an answer that is the same without them),
    /// `service_tier`, `store`, `prompt_cache_key`, `safety_identifier`.
    fn refuse_unsupported(&self) -> Result<(), GatewayError> {
        // Whether the parameter is there with a value that is not neutral.
        let used = |value: &Option<Value>, neutral: fn(&Value) -> bool| {
            value.as_ref().is_some_and(|value| !neutral(value))
        };
        let refused = [
            (
                "logprobs",
                used(&self.logprobs, |v| *v == Value::Bool(false)),
                "log probabilities are not returned",
            ),
            (
                "top_logprobs",
                used(&self.top_logprobs, |v| v.as_u64() == Some(0)),
                "log probabilities are not returned",
            ),
            (
                "functions",
                used(&self.functions, |v| v.as_array().is_some_and(Vec::is_empty)),
                "legacy function calling is not supported; declare them in `tools`",
            ),
            (
                "function_call",
                used(&self.function_call, |v| {
                    matches!(v.as_str(), Some("none" | "auto"))
                }),
                "legacy function calling is not supported; use `tool_choice`",
            ),
            (
                "modalities",
                used(&self.modalities, |v| {
                    v.as_array()
                        .is_some_and(|m| m.iter().all(|m| m.as_str() == Some("text")))
                }),
                "only text output is supported",
            ),
            (
                "audio",
                self.audio.is_some(),
                "audio output is not supported",
            ),
            (
                "web_search_options",
                self.web_search_options.is_some(),
                "built-in web search is not supported",
            ),
            (
                "logit_bias",
                used(&self.logit_bias, |v| {
                    v.as_object().is_some_and(serde_json::Map::is_empty)
                }),
                "token biases are not passed to providers",
            ),
        ];
        for (param, used, why) in refused {
            if used {
                return Err(invalid(
                    param,
                    format!("Switchboard does not support `{param}`: {why}"),
                ));
            }
        }
        Ok(())
    }
}

/// `null` is the field's default: OpenAI and Anthropic take an optional field sent as `null` as
/// absent (`model_dump()` of an SDK's message sends `"tool_calls": null`). For fields that are not
/// `Option`s (an `Option` reads `null` as `None` by itself), with `#[serde(default)]`.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "null_as_default")]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tool_calls: Vec<RequestToolCall>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// An assistant message's refusal, as OpenAI answered it.
    #[serde(default)]
    pub refusal: Option<String>,
    /// A legacy function call of an assistant message: refused unless `null`.
    #[serde(default)]
    pub function_call: Option<Value>,
    /// An assistant message's audio answer (by id): refused unless `null`.
    #[serde(default)]
    pub audio: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPartIn>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPartIn {
    Text { text: String },
    ImageUrl { image_url: ImageUrlIn },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrlIn {
    pub url: String,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestToolCall {
    pub id: String,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
pub struct RequestTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RequestResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaIn>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaIn {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

fn invalid(field: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn role_from_str(role: &str, index: usize) -> Result<pb::Role, GatewayError> {
    Ok(match role {
        "system" => pb::Role::System,
        "developer" => pb::Role::Developer,
        "user" => pb::Role::User,
        "assistant" => pb::Role::Assistant,
        "tool" => pb::Role::Tool,
        "function" => {
            return Err(invalid(
                &format!("messages[{index}].role"),
                "Switchboard does not support legacy function messages (role `function`); \
                 answer a tool call with a message of role `tool` and its `tool_call_id`",
            ));
        }
        other => {
            return Err(invalid(
                &format!("messages[{index}].role"),
                format!(
                    "unknown role `{other}`; expected system, developer, user, assistant or tool"
                ),
            ));
        }
    })
}

impl ChatCompletionRequest {
    /// Translates to the provider-neutral request.
    pub fn into_proto(self) -> Result<pb::ChatRequest, GatewayError> {
        self.refuse_unsupported()?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, message) in self.messages.into_iter().enumerate() {
            let role = role_from_str(&message.role, index)?;
            for (field, value, why) in [
                (
                    "function_call",
                    &message.function_call,
                    "legacy function calling is not supported; use `tool_calls`",
                ),
                ("audio", &message.audio, "audio answers are not supported"),
            ] {
                if value.is_some() {
                    return Err(invalid(
                        &format!("messages[{index}].{field}"),
                        format!("Switchboard does not support `{field}`: {why}"),
                    ));
                }
            }
            let content = match message.content {
                None => Vec::new(),
                Some(MessageContent::Text(text)) => vec![pb::ContentPart {
                    part: Some(pb::content_part::Part::Text(text)),
                }],
                Some(MessageContent::Parts(parts)) => parts
                    .into_iter()
                    .map(|part| pb::ContentPart {
                        part: Some(match part {
                            ContentPartIn::Text { text } => pb::content_part::Part::Text(text),
                            ContentPartIn::ImageUrl { image_url } => {
                                pb::content_part::Part::ImageUrl(pb::ImageUrl {
                                    url: image_url.url,
                                    detail: image_url.detail.unwrap_or_default(),
                                })
                            }
                        }),
                    })
                    .collect(),
            };
            let tool_calls = message
                .tool_calls
                .into_iter()
                .map(|call| {
                    let (id, signature) = tool_id::decode(&call.id);
                    pb::ToolCall {
                        id,
                        name: call.function.name,
                        arguments_json: call.function.arguments,
                        signature,
                    }
                })
                .collect();
            // A result names the call by the id it was shown; the signature rides on the call.
            let tool_call_id = message
                .tool_call_id
                .map(|shown| tool_id::decode(&shown).0)
                .unwrap_or_default();
            messages.push(pb::Message {
                role: role as i32,
                content,
                name: message.name.unwrap_or_default(),
                tool_calls,
                tool_call_id,
                refusal: message.refusal.unwrap_or_default(),
                ..Default::default()
            });
        }
        let mut tools = Vec::with_capacity(self.tools.len());
        for (index, tool) in self.tools.into_iter().enumerate() {
            if tool.kind != "function" {
                return Err(invalid(
                    &format!("tools[{index}].type"),
                    format!("unsupported tool type `{}`", tool.kind),
                ));
            }
            tools.push(pb::Tool {
                name: tool.function.name,
                description: tool.function.description.unwrap_or_default(),
                parameters_json: tool
                    .function
                    .parameters
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                strict: tool.function.strict.unwrap_or(false),
            });
        }
        let tool_choice = match self.tool_choice {
            None => None,
            Some(Value::String(mode)) => Some(pb::ToolChoice {
                choice: Some(pb::tool_choice::Choice::Mode(match mode.as_str() {
                    "none" => pb::ToolChoiceMode::None as i32,
                    "auto" => pb::ToolChoiceMode::Auto as i32,
                    "required" => pb::ToolChoiceMode::Required as i32,
                    other => {
                        return Err(invalid(
                            "tool_choice",
                            format!("unknown tool_choice `{other}`"),
                        ));
                    }
                })),
            }),
            Some(Value::Object(object)) => {
                let name = object
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("tool_choice.function.name", "missing function name"))?;
                Some(pb::ToolChoice {
                    choice: Some(pb::tool_choice::Choice::FunctionName(name.to_owned())),
                })
            }
            Some(_) => return Err(invalid("tool_choice", "expected a string or an object")),
        };
        let thinking = match self.reasoning_effort.as_deref() {
            None => None,
            Some(effort @ ("none" | "minimal" | "low" | "medium" | "high")) => {
                Some(pb::ThinkingConfig {
                    enabled: effort != "none",
                    budget_tokens: 0,
                    effort: effort.to_owned(),
                })
            }
            Some(other) => {
                return Err(invalid(
                    "reasoning_effort",
                    format!(
                        "unknown reasoning effort `{other}`; expected none, minimal, low, medium or high"
                    ),
                ));
            }
        };
        let response_format = match self.response_format {
            None => None,
            Some(format) => Some(match format.kind.as_str() {
                "text" => pb::ResponseFormat {
                    r#type: pb::ResponseFormatType::Text as i32,
                    ..Default::default()
                },
                "json_object" => pb::ResponseFormat {
                    r#type: pb::ResponseFormatType::JsonObject as i32,
                    ..Default::default()
                },
                "json_schema" => {
                    let schema = format.json_schema.ok_or_else(|| {
                        invalid(
                            "response_format.json_schema",
                            "required for type json_schema",
                        )
                    })?;
                    pb::ResponseFormat {
                        r#type: pb::ResponseFormatType::JsonSchema as i32,
                        schema_name: schema.name,
                        json_schema_json: schema.schema.map(|s| s.to_string()).unwrap_or_default(),
                        strict: schema.strict.unwrap_or(false),
                    }
                }
                other => {
                    return Err(invalid(
                        "response_format.type",
                        format!("unknown response format `{other}`"),
                    ));
                }
            }),
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(stop)) => vec![stop],
            Some(StopField::Many(stops)) => stops,
        };
        Ok(pb::ChatRequest {
            model: self.model,
            messages,
            tools,
            tool_choice,
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                max_tokens: self.max_completion_tokens.or(self.max_tokens),
                stop,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                seed: self.seed,
                n: self.n,
                top_k: self.top_k,
            }),
            response_format,
            parallel_tool_calls: self.parallel_tool_calls,
            user: self.user.unwrap_or_default(),
            tags: self.metadata.unwrap_or_default(),
            thinking,
        })
    }
}

// === response ===

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChoiceOut>,
    pub usage: UsageOut,
    /// Switchboard's extension: which target served, attempts, cache outcome.
    pub switchboard: SwitchboardInfo,
}

#[derive(Debug, Serialize)]
pub struct ChoiceOut {
    pub index: u32,
    pub message: MessageOut,
    /// One of OpenAI's values, never `null` (see [`finish_reason_out`]).
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct MessageOut {
    pub role: &'static str,
    pub content: Option<String>,
    /// The model's refusal; `null` when it did not refuse (as OpenAI sends it).
    pub refusal: Option<String>,
    /// The model's reasoning text (extension), when it returned any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Debug, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Serialize)]
pub struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptDetails,
    pub completion_tokens_details: CompletionDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchboardInfo {
    pub request_id: String,
    pub cache: &'static str,
    pub provider: String,
    pub served_model: String,
    pub target: String,
    /// Alias of the configured API key that served (never the key); absent for a provider's own key.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_alias: String,
    pub attempts: u32,
    pub attempt_errors: Vec<AttemptOut>,
    /// The neutral finish reason when the answer's `finish_reason` / `stop_reason` is the closest
    /// standard value rather than the same (`error`, `unspecified`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_detail: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptOut {
    pub target: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_alias: String,
    pub error_code: String,
    pub http_status: u32,
}

/// The neutral finish reason's name, for `switchboard.finish_detail`.
pub fn finish_detail_str(reason: i32) -> &'static str {
    match pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Unspecified => "unspecified",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::ToolCalls => "tool_calls",
        pb::FinishReason::ContentFilter => "content_filter",
        pb::FinishReason::Error => "error",
    }
}

/// OpenAI's `finish_reason` for a neutral one, and whether it is only the closest value (the
/// original then goes in `switchboard.finish_detail`). OpenAI's values are `stop`, `length`,
/// `tool_calls`, `content_filter` (and the legacy `function_call`); strict clients (async-openai,
/// typed Java and .NET SDKs) fail on any other, and on `null` in a complete answer.
///
/// - `Error` (the provider ended the answer before it was complete, for a reason of its own:
///   Gemini `MALFORMED_FUNCTION_CALL`, `OTHER`, …) is `length`, OpenAI's value for an incomplete
///   answer: clients do not take the text as a finished answer, do not run tool calls (they look
///   for `tool_calls`), and SDK helpers such as openai-python's `parse()` raise rather than parse
///   it. `stop` would pass a broken answer as complete; `content_filter` would blame a content
///   policy that did not act (and agents tell the user so).
/// - `Unspecified` (the provider gave no reason) is `tool_calls` when the answer calls tools,
///   else `stop`: what the answer shows. Only in complete answers: a stream's chunks before the
///   end have no reason (`null`, as OpenAI's).
fn finish_reason_out(reason: i32, calls_tools: bool) -> (&'static str, bool) {
    match pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Stop => ("stop", false),
        pb::FinishReason::Length => ("length", false),
        pb::FinishReason::ToolCalls => ("tool_calls", false),
        pb::FinishReason::ContentFilter => ("content_filter", false),
        pb::FinishReason::Error => ("length", true),
        pb::FinishReason::Unspecified if calls_tools => ("tool_calls", true),
        pb::FinishReason::Unspecified => ("stop", true),
    }
}

pub fn usage_out(usage: Option<&pb::Usage>) -> UsageOut {
    let usage = usage.cloned().unwrap_or_default();
    UsageOut {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: usage.cached_prompt_tokens,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: usage.reasoning_tokens,
        },
    }
}

pub fn switchboard_info(
    request_id: &str,
    cache: &'static str,
    route: Option<&pb::RouteInfo>,
) -> SwitchboardInfo {
    let route = route.cloned().unwrap_or_default();
    SwitchboardInfo {
        request_id: request_id.to_owned(),
        cache,
        provider: route.provider,
        served_model: route.model,
        target: route.target,
        key_alias: route.key_alias,
        finish_detail: None,
        attempts: route.attempt_count,
        attempt_errors: route
            .attempts
            .into_iter()
            .filter(|attempt| !attempt.error_code.is_empty())
            .map(|attempt| AttemptOut {
                target: attempt.target,
                key_alias: attempt.key_alias,
                error_code: attempt.error_code,
                http_status: attempt.http_status,
            })
            .collect(),
    }
}

fn tool_calls_out(calls: &[pb::ToolCall]) -> Vec<ToolCallOut> {
    calls
        .iter()
        .map(|call| ToolCallOut {
            id: tool_id::encode(&call.id, &call.signature),
            kind: "function",
            function: FunctionCallOut {
                name: call.name.clone(),
                arguments: call.arguments_json.clone(),
            },
        })
        .collect()
}

/// The reasoning text of thinking blocks or pieces (redacted ones have none), `None` when empty.
fn reasoning<'a>(texts: impl Iterator<Item = &'a str>) -> Option<String> {
    let text: String = texts.collect();
    (!text.is_empty()).then_some(text)
}

impl ChatCompletion {
    pub fn from_proto(response: &pb::ChatResponse, mut info: SwitchboardInfo) -> Self {
        ChatCompletion {
            id: response.id.clone(),
            object: "chat.completion",
            created: response.created,
            model: response.model.clone(),
            choices: response
                .choices
                .iter()
                .map(|choice| {
                    let message = choice.message.clone().unwrap_or_default();
                    let text = message.joined_text();
                    let (finish_reason, closest) =
                        finish_reason_out(choice.finish_reason, !message.tool_calls.is_empty());
                    // One `switchboard` object per answer: the first choice's detail (the
                    // faces' callers ask for one choice).
                    if closest && info.finish_detail.is_none() {
                        info.finish_detail = Some(finish_detail_str(choice.finish_reason));
                    }
                    ChoiceOut {
                        index: choice.index,
                        message: MessageOut {
                            role: "assistant",
                            content: if text.is_empty()
                                && (!message.tool_calls.is_empty() || !message.refusal.is_empty())
                            {
                                None
                            } else {
                                Some(text)
                            },
                            refusal: (!message.refusal.is_empty()).then(|| message.refusal.clone()),
                            reasoning_content: reasoning(
                                message.thinking.iter().map(|t| t.text.as_str()),
                            ),
                            tool_calls: tool_calls_out(&message.tool_calls),
                        },
                        finish_reason,
                    }
                })
                .collect(),
            usage: usage_out(response.usage.as_ref()),
            switchboard: info,
        }
    }
}

// === streaming ===

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChunkChoiceOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    /// On the chunk whose `finish_reason` is only the closest of OpenAI's values: the neutral one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchboard: Option<FinishDetail>,
}

/// The `switchboard` extension of a stream chunk (the usage chunk's has who served as well).
#[derive(Debug, Serialize)]
pub struct FinishDetail {
    pub finish_detail: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoiceOut {
    pub index: u32,
    pub delta: DeltaOut,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, Default)]
pub struct DeltaOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The next piece of the model's refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The next piece of the model's reasoning text (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDeltaOut>,
}

#[derive(Debug, Serialize)]
pub struct ToolCallDeltaOut {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDeltaOut,
}

#[derive(Debug, Serialize)]
pub struct FunctionDeltaOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

fn role_str(role: i32) -> Option<&'static str> {
    match pb::Role::try_from(role).unwrap_or(pb::Role::Unspecified) {
        pb::Role::Assistant => Some("assistant"),
        pb::Role::Unspecified => None,
        pb::Role::System => Some("system"),
        pb::Role::User => Some("user"),
        pb::Role::Tool => Some("tool"),
        pb::Role::Developer => Some("developer"),
    }
}

impl ChatCompletionChunk {
    /// The content chunk (usage is sent separately, in its own chunk, as OpenAI does).
    pub fn from_proto(chunk: &pb::ChatChunk, id: &str) -> Self {
        let mut switchboard = None;
        ChatCompletionChunk {
            id: id.to_owned(),
            object: "chat.completion.chunk",
            created: chunk.created,
            model: chunk.model.clone(),
            choices: chunk
                .choices
                .iter()
                .map(|choice| ChunkChoiceOut {
                    index: choice.index,
                    delta: DeltaOut {
                        role: role_str(choice.role),
                        content: if choice.content.is_empty() {
                            None
                        } else {
                            Some(choice.content.clone())
                        },
                        refusal: (!choice.refusal.is_empty()).then(|| choice.refusal.clone()),
                        reasoning_content: reasoning(
                            choice.thinking.iter().map(|t| t.text.as_str()),
                        ),
                        tool_calls: choice
                            .tool_calls
                            .iter()
                            .map(|delta| ToolCallDeltaOut {
                                index: delta.index,
                                id: (!delta.id.is_empty())
                                    .then(|| tool_id::encode(&delta.id, &delta.signature)),
                                kind: (!delta.id.is_empty()).then_some("function"),
                                function: FunctionDeltaOut {
                                    name: (!delta.name.is_empty()).then(|| delta.name.clone()),
                                    arguments: delta.arguments_delta.clone(),
                                },
                            })
                            .collect(),
                    },
                    // No reason: the choice goes on (or the stream ends without one).
                    finish_reason: (choice.finish_reason != pb::FinishReason::Unspecified as i32)
                        .then(|| {
                            let (reason, closest) = finish_reason_out(choice.finish_reason, false);
                            if closest {
                                switchboard.get_or_insert(FinishDetail {
                                    finish_detail: finish_detail_str(choice.finish_reason),
                                });
                            }
                            reason
                        }),
                })
                .collect(),
            usage: None,
            switchboard,
        }
    }

    /// The final usage chunk (`stream_options.include_usage`).
    pub fn usage_only(id: &str, model: &str, created: i64, usage: &pb::Usage) -> Self {
        ChatCompletionChunk {
            id: id.to_owned(),
            object: "chat.completion.chunk",
            created,
            model: model.to_owned(),
            choices: Vec::new(),
            usage: Some(usage_out(Some(usage))),
            switchboard: None,
        }
    }
}

// === models and errors ===

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelOut>,
}

#[derive(Debug, Serialize)]
pub struct ModelOut {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
}

impl From<pb::Model> for ModelOut {
    fn from(model: pb::Model) -> Self {
        ModelOut {
            id: model.id,
            object: "model",
            created: model.created,
            owned_by: model.owned_by,
        }
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<pb::ChatRequest, GatewayError> {
        serde_json::from_str::<ChatCompletionRequest>(json)
            .unwrap()
            .into_proto()
    }

    #[test]
    fn translates_a_full_request() {
        let request = parse(
            r#"{"model":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"}],
              "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
              "tool_choice":{"type":"function","function":{"name":"f"}},
              "response_format":{"type":"json_object"},
              "temperature":0.2,"max_completion_tokens":7,"stop":"END","seed":3,"user":"u1",
              "metadata":{"task":"qa"}}"#,
        )
        .unwrap();
        assert_eq!(request.model, "m");
        assert_eq!(request.messages.len(), 4);
        assert_eq!(request.messages[0].role, pb::Role::System as i32);
        assert_eq!(request.messages[1].content.len(), 2);
        assert_eq!(
            request.messages[2].tool_calls[0].arguments_json,
            "{\"a\":1}"
        );
        assert_eq!(request.messages[3].tool_call_id, "c1");
        assert_eq!(request.tools[0].parameters_json, "{\"type\":\"object\"}");
        assert_eq!(
            request.tool_choice.unwrap().choice,
            Some(pb::tool_choice::Choice::FunctionName("f".into()))
        );
        assert_eq!(
            request.response_format.unwrap().r#type,
            pb::ResponseFormatType::JsonObject as i32
        );
        let sampling = request.sampling.unwrap();
        assert_eq!(sampling.max_tokens, Some(7));
        assert_eq!(sampling.stop, vec!["END".to_owned()]);
        assert_eq!(request.tags.get("task").map(String::as_str), Some("qa"));
    }

    #[test]
    fn unknown_role_names_the_field() {
        let error =
            parse(r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#).unwrap_err();
        match error {
            GatewayError::InvalidRequest { field, .. } => assert_eq!(field, "messages[0].role"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reasoning_effort_is_the_thinking_effort_and_an_unknown_one_is_refused() {
        let with = |effort: &str| {
            parse(&format!(
                r#"{{"model":"m","reasoning_effort":"{effort}","messages":[{{"role":"user","content":"x"}}]}}"#
            ))
        };
        assert_eq!(
            with("high").unwrap().thinking,
            Some(pb::ThinkingConfig {
                enabled: true,
                budget_tokens: 0,
                effort: "high".into(),
            })
        );
        let none = with("none").unwrap().thinking.unwrap();
        assert!(!none.enabled && none.effort == "none");
        assert!(
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
                .unwrap()
                .thinking
                .is_none()
        );
        match with("extreme").unwrap_err() {
            GatewayError::InvalidRequest { field, .. } => assert_eq!(field, "reasoning_effort"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn chunk_serialises_like_openai() {
        let chunk = pb::ChatChunk {
            id: "x".into(),
            model: "m".into(),
            created: 1,
            choices: vec![pb::ChoiceDelta {
                index: 0,
                role: pb::Role::Assistant as i32,
                content: "hi".into(),
                ..Default::default()
            }],
            usage: None,
        };
        let json =
            serde_json::to_value(ChatCompletionChunk::from_proto(&chunk, "chatcmpl-1")).unwrap();
        assert_eq!(json["object"], "chat.completion.chunk");
        assert_eq!(json["id"], "chatcmpl-1");
        assert_eq!(json["choices"][0]["delta"]["content"], "hi");
        assert_eq!(json["choices"][0]["delta"]["role"], "assistant");
        assert!(json["choices"][0]["finish_reason"].is_null());
        assert!(json.get("usage").is_none());
    }

    #[test]
    fn a_refusal_is_shown_as_openai_shows_it() {
        let refusal = |text: &str| pb::ChatResponse {
            choices: vec![pb::Choice {
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    refusal: text.into(),
                    ..Default::default()
                }),
                finish_reason: pb::FinishReason::Stop as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = |response: &pb::ChatResponse| {
            serde_json::to_value(ChatCompletion::from_proto(
                response,
                switchboard_info("r", "miss", None),
            ))
            .unwrap()
        };
        let refused = json(&refusal("I can't help with that."));
        let message = &refused["choices"][0]["message"];
        assert_eq!(message["refusal"], "I can't help with that.");
        assert!(message["content"].is_null(), "{message}");
        // No refusal: `"refusal": null`, as OpenAI sends it, and the text as content.
        let answered = json(&pb::ChatResponse {
            choices: vec![pb::Choice {
                message: Some(pb::Message::text(pb::Role::Assistant, "hi")),
                ..Default::default()
            }],
            ..Default::default()
        });
        let message = answered["choices"][0]["message"].as_object().unwrap();
        assert!(message["refusal"].is_null(), "{message:?}");
        assert_eq!(message["content"], "hi");

        // Streamed: `refusal` pieces, absent from other deltas.
        let chunk = |delta: pb::ChoiceDelta| {
            serde_json::to_value(ChatCompletionChunk::from_proto(
                &pb::ChatChunk {
                    choices: vec![delta],
                    ..Default::default()
                },
                "c",
            ))
            .unwrap()
        };
        let piece = chunk(pb::ChoiceDelta {
            refusal: "I can't".into(),
            ..Default::default()
        });
        assert_eq!(
            piece["choices"][0]["delta"],
            serde_json::json!({ "refusal": "I can't" })
        );
        let text = chunk(pb::ChoiceDelta {
            content: "hi".into(),
            ..Default::default()
        });
        assert!(text["choices"][0]["delta"].get("refusal").is_none());

        // In the history: an assistant refusal is `Message.refusal`.
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},
                {"role":"assistant","content":null,"refusal":"I can't help with that."},
                {"role":"user","content":"y"}]}"#,
        )
        .unwrap();
        assert_eq!(request.messages[1].refusal, "I can't help with that.");
        assert!(request.messages[1].content.is_empty());
        assert!(request.messages[0].refusal.is_empty());
    }

    #[test]
    fn top_k_is_accepted_as_an_extension() {
        let request =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":20}"#)
                .unwrap();
        assert_eq!(request.sampling.unwrap().top_k, Some(20));
        let request = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(request.sampling.unwrap().top_k, None);
    }

    #[test]
    fn thinking_is_reasoning_content_never_content() {
        let response = pb::ChatResponse {
            id: "chatcmpl-1".into(),
            model: "m".into(),
            choices: vec![pb::Choice {
                index: 0,
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::Text("answer".into())),
                    }],
                    thinking: vec![
                        pb::ThinkingBlock {
                            text: "first, ".into(),
                            signature: "Sig==".into(),
                            redacted_data: String::new(),
                        },
                        pb::ThinkingBlock {
                            redacted_data: "Red==".into(),
                            ..Default::default()
                        },
                        pb::ThinkingBlock {
                            text: "then".into(),
                            ..Default::default()
                        },
                    ],
                    stop_sequence: "END".into(),
                    ..Default::default()
                }),
                finish_reason: pb::FinishReason::Stop as i32,
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(ChatCompletion::from_proto(
            &response,
            switchboard_info("r", "miss", None),
        ))
        .unwrap();
        let message = &json["choices"][0]["message"];
        assert_eq!(message["content"], "answer");
        assert_eq!(message["reasoning_content"], "first, then");
        assert!(!message.to_string().contains("Sig=="));
        assert!(!message.to_string().contains("Red=="));
        // A stop sequence is a plain stop here.
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        let mut plain = response.clone();
        if let Some(message) = plain.choices[0].message.as_mut() {
            message.thinking.clear();
        }
        let json = serde_json::to_value(ChatCompletion::from_proto(
            &plain,
            switchboard_info("r", "miss", None),
        ))
        .unwrap();
        assert!(
            json["choices"][0]["message"]
                .get("reasoning_content")
                .is_none()
        );

        let chunk = pb::ChatChunk {
            choices: vec![pb::ChoiceDelta {
                thinking: vec![pb::ThinkingDelta {
                    index: 0,
                    text: "hmm".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(ChatCompletionChunk::from_proto(&chunk, "c")).unwrap();
        assert_eq!(json["choices"][0]["delta"]["reasoning_content"], "hmm");
        assert!(json["choices"][0]["delta"].get("content").is_none());
        let signature_only = pb::ChatChunk {
            choices: vec![pb::ChoiceDelta {
                thinking: vec![pb::ThinkingDelta {
                    index: 0,
                    signature: "Sig==".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json =
            serde_json::to_value(ChatCompletionChunk::from_proto(&signature_only, "c")).unwrap();
        assert_eq!(json["choices"][0]["delta"], serde_json::json!({}));
    }

    #[test]
    fn gemini_call_signatures_ride_in_tool_call_ids_both_ways() {
        let signature = "fake/thought+sig00AA==";
        let shown = crate::tool_id::encode("call_0", signature);
        assert!(shown.starts_with("call_0__thought__"), "{shown}");
        // Answer: the signed call's id carries the signature; an unsigned one is unchanged.
        let call = |id: &str, signature: &str| pb::ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments_json: "{}".into(),
            signature: signature.into(),
        };
        let response = pb::ChatResponse {
            choices: vec![pb::Choice {
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    tool_calls: vec![call("call_0", signature), call("call_1", "")],
                    ..Default::default()
                }),
                finish_reason: pb::FinishReason::ToolCalls as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(ChatCompletion::from_proto(
            &response,
            switchboard_info("r", "miss", None),
        ))
        .unwrap();
        let calls = &json["choices"][0]["message"]["tool_calls"];
        assert_eq!(calls[0]["id"], shown.as_str());
        assert_eq!(calls[1]["id"], "call_1");

        // Next turn: the assistant's call ids and the tool messages' ids are split back.
        let request = parse(&format!(
            r#"{{"model":"m","messages":[
                {{"role":"user","content":"weather?"}},
                {{"role":"assistant","content":null,"tool_calls":[
                  {{"id":"{shown}","type":"function","function":{{"name":"f","arguments":"{{}}"}}}},
                  {{"id":"call_1","type":"function","function":{{"name":"f","arguments":"{{}}"}}}},
                  {{"id":"call_2__thought__","type":"function","function":{{"name":"f","arguments":"{{}}"}}}}]}},
                {{"role":"tool","tool_call_id":"{shown}","content":"sunny"}},
                {{"role":"tool","tool_call_id":"call_1","content":"warm"}},
                {{"role":"tool","tool_call_id":"call_2__thought__","content":"dry"}}]}}"#
        ))
        .unwrap();
        let calls: Vec<(&str, &str)> = request.messages[1]
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.signature.as_str()))
            .collect();
        assert_eq!(
            calls,
            [("call_0", signature), ("call_1", ""), ("call_2", "")]
        );
        let results: Vec<&str> = request.messages[2..]
            .iter()
            .map(|m| m.tool_call_id.as_str())
            .collect();
        assert_eq!(results, ["call_0", "call_1", "call_2"]);

        // Streamed: the delta that carries the id shows it with the signature; later ones no id.
        let delta = |id: &str, signature: &str, arguments: &str| pb::ChatChunk {
            choices: vec![pb::ChoiceDelta {
                tool_calls: vec![pb::ToolCallDelta {
                    index: 0,
                    id: id.into(),
                    name: if id.is_empty() { "" } else { "f" }.into(),
                    arguments_delta: arguments.into(),
                    signature: signature.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let first = serde_json::to_value(ChatCompletionChunk::from_proto(
            &delta("call_0", signature, "{}"),
            "c",
        ))
        .unwrap();
        let first = &first["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first["id"], shown.as_str());
        assert_eq!(first["type"], "function");
        let unsigned = serde_json::to_value(ChatCompletionChunk::from_proto(
            &delta("call_1", "", ""),
            "c",
        ))
        .unwrap();
        assert_eq!(
            unsigned["choices"][0]["delta"]["tool_calls"][0]["id"],
            "call_1"
        );
        let later =
            serde_json::to_value(ChatCompletionChunk::from_proto(&delta("", "", "{}"), "c"))
                .unwrap();
        assert!(
            later["choices"][0]["delta"]["tool_calls"][0]
                .get("id")
                .is_none()
        );
    }

    fn parse_body(json: &str) -> Result<pb::ChatRequest, GatewayError> {
        crate::http::parse_json::<ChatCompletionRequest>(json.as_bytes())?.into_proto()
    }

    #[test]
    fn null_is_an_absent_field() {
        // `messages.append(resp.choices[0].message.model_dump())`, then a hand-built dict with
        // every optional parameter as `null`.
        let request = parse_body(
            r#"{"model":"m","messages":[
                {"role":"system","content":"be brief","name":null},
                {"role":"user","content":"weather?","name":null,"tool_calls":null,"tool_call_id":null},
                {"role":"assistant","content":null,"refusal":null,"audio":null,"function_call":null,
                 "annotations":null,"tool_calls":[{"id":"c1","type":"function",
                   "function":{"name":"f","arguments":null}}]},
                {"role":"tool","tool_call_id":"c1","content":"sunny"},
                {"role":"assistant","content":"It is sunny.","refusal":null,"audio":null,
                 "function_call":null,"tool_calls":null,"annotations":[]},
                {"role":"user","content":"thanks"}],
              "tools":null,"tool_choice":null,"response_format":null,"stream":null,
              "stream_options":null,"stop":null,"n":null,"temperature":null,"top_p":null,
              "top_k":null,"max_tokens":null,"max_completion_tokens":null,"presence_penalty":null,
              "frequency_penalty":null,"seed":null,"parallel_tool_calls":null,"user":null,
              "metadata":null,"reasoning_effort":null,"logprobs":null,"top_logprobs":null,
              "functions":null,"function_call":null,"modalities":null,"audio":null,
              "prediction":null,"web_search_options":null,"service_tier":null,"store":null}"#,
        )
        .unwrap();
        assert_eq!(request.messages.len(), 6);
        assert_eq!(request.messages[2].tool_calls[0].arguments_json, "");
        assert!(request.messages[4].tool_calls.is_empty());
        assert_eq!(request.messages[4].joined_text(), "It is sunny.");
        assert!(request.tools.is_empty());
        assert!(request.tool_choice.is_none() && request.response_format.is_none());
        assert!(request.thinking.is_none());
        let sampling = request.sampling.unwrap();
        assert!(sampling.stop.is_empty());
        assert_eq!((sampling.n, sampling.max_tokens), (None, None));

        let parsed = crate::http::parse_json::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":null,
                "stream_options":{"include_usage":null}}"#,
        )
        .unwrap();
        assert!(!parsed.stream);
        assert!(!parsed.stream_options.unwrap().include_usage);
        // Inside tools and response formats too.
        let request = parse_body(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
              "tools":[{"type":"function","function":{"name":"f","description":null,
                "parameters":null,"strict":null}}],
              "response_format":{"type":"json_schema","json_schema":{"name":null,
                "schema":{"type":"object"},"strict":null}}}"#,
        )
        .unwrap();
        assert_eq!(request.tools[0].description, "");
        assert_eq!(request.response_format.unwrap().schema_name, "");
    }

    #[test]
    fn features_switchboard_lacks_are_refused_by_name_and_neutral_values_accepted() {
        let with = |extra: &str| {
            parse_body(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#
            ))
        };
        for (extra, param) in [
            (r#""logprobs":true"#, "logprobs"),
            (r#""logprobs":true,"top_logprobs":3"#, "logprobs"),
            (r#""top_logprobs":3"#, "top_logprobs"),
            (
                r#""functions":[{"name":"f","parameters":{"type":"object"}}]"#,
                "functions",
            ),
            (r#""function_call":{"name":"f"}"#, "function_call"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"alloy","format":"wav"}"#, "audio"),
            (r#""web_search_options":{}"#, "web_search_options"),
            (r#""logit_bias":{"50256":-100}"#, "logit_bias"),
        ] {
            let error = with(extra).unwrap_err();
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["error"]["type"], "invalid_request_error", "{extra}");
            assert_eq!(body["error"]["param"], param, "{extra}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("Switchboard does not support `{param}`")),
                "{message}"
            );
        }
        // Defaults that SDKs send, and hints that do not change the answer.
        for extra in [
            r#""logprobs":false"#,
            r#""logprobs":false,"top_logprobs":0"#,
            r#""modalities":["text"]"#,
            r#""functions":[]"#,
            r#""function_call":"none""#,
            r#""function_call":"auto""#,
            r#""logit_bias":{}"#,
            r#""logit_bias":null"#,
            r#""prediction":{"type":"content","content":"old text"}"#,
            r#""service_tier":"auto","store":false"#,
        ] {
            assert!(with(extra).is_ok(), "{extra}");
        }

        // Legacy function messages and calls in the history: a clear refusal.
        let field_and_message = |messages: &str| match parse_body(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}},{messages}]}}"#
        ))
        .unwrap_err()
        {
            GatewayError::InvalidRequest { field, message } => (field, message),
            other => panic!("unexpected {other:?}"),
        };
        let (field, message) =
            field_and_message(r#"{"role":"function","name":"f","content":"42"}"#);
        assert_eq!(field, "messages[1].role");
        assert!(message.contains("legacy function messages"), "{message}");
        assert!(message.contains("`tool`"), "{message}");
        let (field, message) = field_and_message(
            r#"{"role":"assistant","content":null,"function_call":{"name":"f","arguments":"{}"}}"#,
        );
        assert_eq!(field, "messages[1].function_call");
        assert!(
            message.contains("Switchboard does not support"),
            "{message}"
        );
    }

    #[test]
    fn finish_reasons_are_openais_values_and_never_null_in_an_answer() {
        let answer = |finish: pb::FinishReason, calls: bool| pb::ChatResponse {
            choices: vec![pb::Choice {
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::Text("partial".into())),
                    }],
                    tool_calls: if calls {
                        vec![pb::ToolCall {
                            id: "c1".into(),
                            name: "f".into(),
                            arguments_json: "{}".into(),
                            signature: String::new(),
                        }]
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                }),
                finish_reason: finish as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = |response: &pb::ChatResponse| {
            serde_json::to_value(ChatCompletion::from_proto(
                response,
                switchboard_info("r", "miss", None),
            ))
            .unwrap()
        };
        // A provider error (Gemini MALFORMED_FUNCTION_CALL): incomplete, and said so.
        let broken = json(&answer(pb::FinishReason::Error, false));
        assert_eq!(broken["choices"][0]["finish_reason"], "length");
        assert_eq!(broken["switchboard"]["finish_detail"], "error");
        assert_eq!(broken["switchboard"]["request_id"], "r");
        // No reason: what the answer shows, never null.
        let calls = json(&answer(pb::FinishReason::Unspecified, true));
        assert_eq!(calls["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(calls["switchboard"]["finish_detail"], "unspecified");
        let text = json(&answer(pb::FinishReason::Unspecified, false));
        assert_eq!(text["choices"][0]["finish_reason"], "stop");
        for (finish, name) in [
            (pb::FinishReason::Stop, "stop"),
            (pb::FinishReason::Length, "length"),
            (pb::FinishReason::ToolCalls, "tool_calls"),
            (pb::FinishReason::ContentFilter, "content_filter"),
        ] {
            let json = json(&answer(finish, false));
            assert_eq!(json["choices"][0]["finish_reason"], name);
            assert!(json["switchboard"].get("finish_detail").is_none(), "{json}");
        }

        // Streamed: the closest value on the finishing chunk with the detail; `null` before it.
        let chunk = |finish: pb::FinishReason| {
            serde_json::to_value(ChatCompletionChunk::from_proto(
                &pb::ChatChunk {
                    choices: vec![pb::ChoiceDelta {
                        finish_reason: finish as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "c",
            ))
            .unwrap()
        };
        let broken = chunk(pb::FinishReason::Error);
        assert_eq!(broken["choices"][0]["finish_reason"], "length");
        assert_eq!(broken["switchboard"]["finish_detail"], "error");
        let going_on = chunk(pb::FinishReason::Unspecified);
        assert!(going_on["choices"][0]["finish_reason"].is_null());
        assert!(going_on.get("switchboard").is_none());
        let done = chunk(pb::FinishReason::ToolCalls);
        assert_eq!(done["choices"][0]["finish_reason"], "tool_calls");
        assert!(done.get("switchboard").is_none());
    }
}
