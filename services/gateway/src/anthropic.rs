//! Anthropic Messages at the front door: `POST /v1/messages`, so that Anthropic clients work
//! unchanged. The request is translated into the provider-neutral `ChatRequest` and served by the
//! same [`Pipeline`](crate::pipeline::Pipeline) as `/v1/chat/completions` (guard → cache → router →
//! usage event); only the wire format differs.
//!
//! - Credentials: `x-api-key` (what Anthropic SDKs send) or `Authorization: Bearer`.
//! - `max_tokens` is required, as Anthropic requires it (`invalid_request_error` otherwise).
//! - `system` (a string or text blocks) becomes a system message; a user turn's `tool_result`
//!   blocks become tool messages (before the turn's own text); `tool_use` blocks become tool calls
//!   with their `input` as JSON text; a `tool_result`'s `is_error` is the tool message's
//!   `tool_error`. `thinking` (`thinking` + `signature`) and `redacted_thinking` (`data`) blocks of
//!   an assistant turn are kept verbatim in `Message.thinking`, so an Anthropic target gets them
//!   back unchanged; other block types and server tools are refused. `top_k` is
//!   `SamplingParams.top_k`; `thinking` (`enabled` + `budget_tokens`, or `disabled`) is
//!   `ChatRequest.thinking`; a tool's `strict` is `Tool.strict` (targets that enforce schemas,
//!   OpenAI's, honour it).
//! - Answers: thinking blocks first (as the provider sent them), then text, then `tool_use`.
//! - A Gemini thought signature on a tool call (`ToolCall.signature`, not Anthropic's thinking
//!   signatures above) rides in the id (`<id>__thought__<signature>`, see [`crate::tool_id`]):
//!   shown in `tool_use.id` (answers and `content_block_start`), split again from `tool_use.id`
//!   and `tool_result.tool_use_id` of the next turn.
//! - Stop reasons: `end_turn`, `stop_sequence` (with the matched `stop_sequence`, when the provider
//!   reported it), `max_tokens`, `tool_use`, `refusal` (content filter, or a refusal).
//! - A refusal (`Message.refusal`, OpenAI's; Anthropic has no such field) is a text block carrying
//!   the refusal text, after any other text, and the stop reason is `refusal`; streamed, its
//!   pieces are `text_delta`s of the text block.
//! - Usage: Anthropic's `input_tokens` excludes cache reads and writes, ours includes them.
//! - Streams: the real event sequence (`message_start`, `content_block_start`, `ping`,
//!   `content_block_delta` with `thinking_delta` / `signature_delta` / `text_delta` /
//!   `input_json_delta`, `content_block_stop`, `message_delta` with the stop reason, stop sequence
//!   and usage (and, an extra field, the gateway's `switchboard` object: who served, after how many
//!   attempts), `message_stop`). A stream that fails after it
//!   started ends with an `error` event, never with `message_stop`.
//! - Errors: `{"type":"error","error":{"type","message"}}` with the status of their code.
//! - Clients: `null` in an optional field is the field absent. `mcp_servers`, `container` and
//!   structured outputs (`output_format`, `output_config.format`) are refused by name rather than
//!   dropped; hints such as `service_tier` are ignored. A provider error (Gemini
//!   `MALFORMED_FUNCTION_CALL`) is `stop_reason: "max_tokens"`, and an answer without a reason
//!   `tool_use` or `end_turn`, with the neutral reason in `switchboard.finish_detail` (see
//!   `stop_reason_out`). `message_start` carries the prompt's `input_tokens` (estimated unless the
//!   first chunk has the provider's count; exact in `message_delta`).

use std::convert::Infallible;

use axum::{
    Json,
    body::Body,
    extract::State,
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use switchboard_proto::chat::v1 as pb;
use switchboard_status::ServiceError;
use tracing::Instrument;

use crate::{
    app::Shared,
    error::GatewayError,
    http,
    openai::{SwitchboardInfo, finish_detail_str, null_as_default, switchboard_info},
    pipeline::{RequestContext, StreamEvent},
    tool_id,
};

// === request ===

/// `POST /v1/messages` body. Unknown fields are ignored, and `null` is an absent field, as
/// Anthropic takes it (fields that are not `Option`s read it with [`null_as_default`]).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub system: Option<InContent>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tools: Vec<InTool>,
    #[serde(default)]
    pub tool_choice: Option<InToolChoice>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stop_sequences: Vec<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub metadata: Option<InMetadata>,
    #[serde(default)]
    pub thinking: Option<InThinking>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    // Features Switchboard does not have, read only to refuse them: see `refuse_unsupported`.
    #[serde(default)]
    mcp_servers: Option<Value>,
    #[serde(default)]
    container: Option<Value>,
    #[serde(default)]
    output_format: Option<Value>,
    #[serde(default)]
    output_config: Option<Value>,
}

/// `thinking`: `{"type": "enabled", "budget_tokens": N}` or `{"type": "disabled"}`.
#[derive(Debug, Deserialize)]
pub struct InThinking {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub budget_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: InContent,
}

/// A string, or content blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InContent {
    Text(String),
    Blocks(Vec<InBlock>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InBlock {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<InContent>,
        #[serde(default, deserialize_with = "null_as_default")]
        is_error: bool,
    },
    Thinking {
        #[serde(default, deserialize_with = "null_as_default")]
        thinking: String,
        #[serde(default, deserialize_with = "null_as_default")]
        signature: String,
    },
    RedactedThinking {
        #[serde(default, deserialize_with = "null_as_default")]
        data: String,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Deserialize)]
pub struct InTool {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Absent or `custom` for client tools; server tools (`web_search_…`) are refused.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Structured outputs: calls must match `input_schema` exactly (kept as `Tool.strict`, which
    /// providers that enforce schemas honour).
    #[serde(default, deserialize_with = "null_as_default")]
    pub strict: bool,
}

#[derive(Debug, Deserialize)]
pub struct InToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub disable_parallel_tool_use: bool,
}

#[derive(Debug, Deserialize)]
pub struct InMetadata {
    #[serde(default)]
    pub user_id: Option<String>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest {
        field: field.into(),
        message: message.into(),
    }
}

fn text_part(text: String) -> pb::ContentPart {
    pb::ContentPart {
        part: Some(pb::content_part::Part::Text(text)),
    }
}

fn image_part(source: ImageSource) -> pb::ContentPart {
    let url = match source {
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        ImageSource::Url { url } => url,
    };
    pb::ContentPart {
        part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
            url,
            detail: String::new(),
        })),
    }
}

/// Text and image parts of `content` (a system prompt or a tool result).
fn plain_parts(content: InContent, field: &str) -> Result<Vec<pb::ContentPart>, GatewayError> {
    match content {
        InContent::Text(text) => Ok(vec![text_part(text)]),
        InContent::Blocks(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.into_iter().enumerate() {
                match block {
                    InBlock::Text { text } => parts.push(text_part(text)),
                    InBlock::Image { source } => parts.push(image_part(source)),
                    _ => {
                        return Err(invalid(
                            format!("{field}[{i}].type"),
                            "only text and image blocks are allowed here",
                        ));
                    }
                }
            }
            Ok(parts)
        }
    }
}

fn unsupported(field: String) -> GatewayError {
    invalid(
        field,
        "unsupported content block type; expected text, image, tool_use or tool_result",
    )
}

impl MessagesRequest {
    /// Refuses a parameter asking for what Switchboard cannot give rather than answering without
    /// it, which would mislead the caller (400 `invalid_request_error` naming it, as server tools
    /// are refused): MCP servers (`mcp_servers`: the model would answer without their tools), a
    /// code-execution `container` (and its skills), structured outputs (`output_format`, beta, and
    /// `output_config.format`: the answer would not be held to the schema). Neutral values
    /// (`null`, `mcp_servers: []`) are accepted.
    ///
    /// Hints about how the provider serves, not what it answers, are ignored like unknown fields:
    /// `service_tier`, `inference_geo`, `output_config.effort`, `context_management` (what the
    /// provider may clear from a long context).
    fn refuse_unsupported(&self) -> Result<(), GatewayError> {
        let format = self
            .output_config
            .as_ref()
            .and_then(|config| config.get("format"))
            .filter(|format| !format.is_null());
        let refused = [
            (
                "mcp_servers",
                self.mcp_servers
                    .as_ref()
                    .is_some_and(|servers| servers.as_array().is_none_or(|s| !s.is_empty())),
                "MCP servers are not supported; declare their tools in `tools`",
            ),
            (
                "container",
                self.container.is_some(),
                "code-execution containers are not supported",
            ),
            (
                "output_format",
                self.output_format.is_some(),
                "structured outputs are not supported",
            ),
            (
                "output_config.format",
                format.is_some(),
                "structured outputs are not supported",
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

    /// Translates to the provider-neutral request.
    pub fn into_proto(self) -> Result<pb::ChatRequest, GatewayError> {
        self.refuse_unsupported()?;
        let max_tokens = self
            .max_tokens
            .ok_or_else(|| invalid("max_tokens", "Field required"))?;
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = self.system {
            messages.push(pb::Message {
                role: pb::Role::System as i32,
                content: plain_parts(system, "system")?,
                ..Default::default()
            });
        }
        for (index, message) in self.messages.into_iter().enumerate() {
            let field = format!("messages[{index}]");
            let assistant = match message.role.as_str() {
                "user" => false,
                "assistant" => true,
                other => {
                    return Err(invalid(
                        format!("{field}.role"),
                        format!("unknown role `{other}`; expected user or assistant"),
                    ));
                }
            };
            let blocks = match message.content {
                InContent::Text(text) => vec![InBlock::Text { text }],
                InContent::Blocks(blocks) => blocks,
            };
            let mut content = Vec::new();
            let mut tool_calls = Vec::new();
            let mut thinking = Vec::new();
            for (i, block) in blocks.into_iter().enumerate() {
                let block_field = || format!("{field}.content[{i}]");
                match block {
                    InBlock::Text { text } => content.push(text_part(text)),
                    InBlock::Image { source } if !assistant => content.push(image_part(source)),
                    InBlock::ToolUse { id, name, input } if assistant => {
                        let arguments_json = match input {
                            Value::Null => "{}".to_owned(),
                            Value::Object(_) => input.to_string(),
                            _ => {
                                return Err(invalid(
                                    format!("{}.input", block_field()),
                                    "must be an object",
                                ));
                            }
                        };
                        let (id, signature) = tool_id::decode(&id);
                        tool_calls.push(pb::ToolCall {
                            id,
                            name,
                            arguments_json,
                            signature,
                        });
                    }
                    InBlock::ToolResult {
                        tool_use_id,
                        content: result,
                        is_error,
                    } if !assistant => {
                        // Tool results answer the previous assistant turn: they go first.
                        let parts = match result {
                            Some(result) => {
                                plain_parts(result, &format!("{}.content", block_field()))?
                            }
                            None => Vec::new(),
                        };
                        messages.push(pb::Message {
                            role: pb::Role::Tool as i32,
                            content: parts,
                            tool_call_id: tool_id::decode(&tool_use_id).0,
                            tool_error: is_error,
                            ..Default::default()
                        });
                    }
                    // Kept verbatim: Anthropic checks the signature when they come back.
                    InBlock::Thinking {
                        thinking: text,
                        signature,
                    } if assistant => thinking.push(pb::ThinkingBlock {
                        text,
                        signature,
                        redacted_data: String::new(),
                    }),
                    InBlock::RedactedThinking { data } if assistant => {
                        thinking.push(pb::ThinkingBlock {
                            redacted_data: data,
                            ..Default::default()
                        });
                    }
                    InBlock::Unsupported => {
                        return Err(unsupported(format!("{}.type", block_field())));
                    }
                    _ => {
                        return Err(invalid(
                            format!("{}.type", block_field()),
                            format!("this block type is not allowed in a {} turn", message.role),
                        ));
                    }
                }
            }
            if content.is_empty() && tool_calls.is_empty() && thinking.is_empty() {
                continue;
            }
            messages.push(pb::Message {
                role: if assistant {
                    pb::Role::Assistant
                } else {
                    pb::Role::User
                } as i32,
                content,
                tool_calls,
                thinking,
                ..Default::default()
            });
        }
        let mut tools = Vec::with_capacity(self.tools.len());
        for (index, tool) in self.tools.into_iter().enumerate() {
            if let Some(kind) = tool.kind.as_deref()
                && kind != "custom"
            {
                return Err(invalid(
                    format!("tools[{index}].type"),
                    format!("server tool `{kind}` is not supported"),
                ));
            }
            let schema = tool
                .input_schema
                .ok_or_else(|| invalid(format!("tools[{index}].input_schema"), "Field required"))?;
            tools.push(pb::Tool {
                name: tool.name,
                description: tool.description.unwrap_or_default(),
                parameters_json: schema.to_string(),
                strict: tool.strict,
            });
        }
        let mut parallel_tool_calls = None;
        let tool_choice = match self.tool_choice {
            None => None,
            Some(choice) => {
                if choice.disable_parallel_tool_use {
                    parallel_tool_calls = Some(false);
                }
                let mode = |mode: pb::ToolChoiceMode| pb::tool_choice::Choice::Mode(mode as i32);
                Some(pb::ToolChoice {
                    choice: Some(match choice.kind.as_str() {
                        "auto" => mode(pb::ToolChoiceMode::Auto),
                        "any" => mode(pb::ToolChoiceMode::Required),
                        "none" => mode(pb::ToolChoiceMode::None),
                        "tool" => pb::tool_choice::Choice::FunctionName(
                            choice
                                .name
                                .filter(|n| !n.is_empty())
                                .ok_or_else(|| invalid("tool_choice.name", "Field required"))?,
                        ),
                        other => {
                            return Err(invalid(
                                "tool_choice.type",
                                format!("unknown tool_choice type `{other}`"),
                            ));
                        }
                    }),
                })
            }
        };
        let thinking = match self.thinking {
            None => None,
            Some(thinking) => Some(match thinking.kind.as_str() {
                "enabled" => pb::ThinkingConfig {
                    enabled: true,
                    budget_tokens: thinking.budget_tokens.ok_or_else(|| {
                        invalid("thinking.enabled.budget_tokens", "Field required")
                    })?,
                    ..Default::default()
                },
                "disabled" => pb::ThinkingConfig::default(),
                other => {
                    return Err(invalid(
                        "thinking.type",
                        format!("unknown thinking type `{other}`; expected enabled or disabled"),
                    ));
                }
            }),
        };
        Ok(pb::ChatRequest {
            thinking,
            model: self.model,
            messages,
            tools,
            tool_choice,
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                max_tokens: Some(max_tokens),
                stop: self.stop_sequences,
                ..Default::default()
            }),
            response_format: None,
            parallel_tool_calls,
            user: self.metadata.and_then(|m| m.user_id).unwrap_or_default(),
            tags: Default::default(),
        })
    }
}

// === response ===

/// A complete Anthropic message.
#[derive(Debug, Serialize)]
pub struct MessageOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: String,
    pub content: Vec<BlockOut>,
    pub stop_reason: &'static str,
    pub stop_sequence: Option<String>,
    pub usage: UsageOut,
    /// Extension, only when `stop_reason` is the closest of Anthropic's values rather than the
    /// same: the neutral finish reason (`finish_detail`, see [`stop_reason_out`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchboard: Option<crate::openai::FinishDetail>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockOut {
    Thinking {
        thinking: String,
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

#[derive(Debug, Serialize, Default, PartialEq)]
pub struct UsageOut {
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub cache_creation_input_tokens: u32,
    pub cache_read_input_tokens: u32,
}

/// Anthropic's error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: String,
}

/// Anthropic's stop reason for an answer's finish reason, stop sequence (reported by the
/// provider, or empty), whether it calls tools and whether the model refused; and whether it is
/// only the closest value (the neutral reason then goes in `switchboard.finish_detail`).
///
/// - `Error` (the provider ended the answer before it was complete, for a reason of its own:
///   Gemini `MALFORMED_FUNCTION_CALL`, `OTHER`, …) is `max_tokens`, Anthropic's value for an
///   answer cut short: clients do not take it as finished, and the tool-use guidance for it is to
///   retry, which is what a malformed call needs. `end_turn` would pass a broken (often empty)
///   answer as complete; `refusal` would tell the user the request broke a usage policy (Claude
///   Code says so) and that context should be reset.
/// - `Unspecified` (no reason from the provider) is what the answer shows: `tool_use` when it calls
///   tools (else they would not be run), `end_turn` otherwise.
fn stop_reason_out(
    reason: i32,
    stop_sequence: &str,
    calls_tools: bool,
    refused: bool,
) -> (&'static str, bool) {
    if refused {
        // Anthropic has no refusal field: the refusal is said, and the stop reason says so.
        return ("refusal", false);
    }
    match pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Stop if !stop_sequence.is_empty() => ("stop_sequence", false),
        pb::FinishReason::Stop => ("end_turn", false),
        pb::FinishReason::Length => ("max_tokens", false),
        pb::FinishReason::ToolCalls => ("tool_use", false),
        pb::FinishReason::ContentFilter => ("refusal", false),
        pb::FinishReason::Error => ("max_tokens", true),
        pb::FinishReason::Unspecified if calls_tools => ("tool_use", true),
        pb::FinishReason::Unspecified => ("end_turn", true),
    }
}

/// The thinking block of a neutral one: `redacted_thinking` when it has redacted data.
fn thinking_out(block: &pb::ThinkingBlock) -> BlockOut {
    if block.redacted_data.is_empty() {
        BlockOut::Thinking {
            thinking: block.text.clone(),
            signature: block.signature.clone(),
        }
    } else {
        BlockOut::RedactedThinking {
            data: block.redacted_data.clone(),
        }
    }
}

/// Anthropic usage: `input_tokens` excludes cache reads and writes.
pub fn usage_out(usage: Option<&pb::Usage>) -> UsageOut {
    let usage = usage.copied().unwrap_or_default();
    UsageOut {
        input_tokens: usage
            .prompt_tokens
            .saturating_sub(usage.cached_prompt_tokens)
            .saturating_sub(usage.cache_write_tokens),
        output_tokens: usage.completion_tokens,
        cache_creation_input_tokens: usage.cache_write_tokens,
        cache_read_input_tokens: usage.cached_prompt_tokens,
    }
}

/// `msg_` + the request id without dashes.
pub fn message_id(request_id: &str) -> String {
    let mut id = String::with_capacity(4 + request_id.len());
    id.push_str("msg_");
    id.extend(request_id.chars().filter(|c| *c != '-'));
    id
}

/// A tool call's arguments as the `input` object (`{}` when empty or not an object).
fn input_of(arguments_json: &str) -> Value {
    match serde_json::from_str::<Value>(arguments_json) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            if !arguments_json.trim().is_empty() {
                tracing::warn!("tool call arguments are not a JSON object; sent as {{}}");
            }
            json!({})
        }
    }
}

impl MessageOut {
    /// The first choice of `response` as an Anthropic message.
    pub fn from_proto(response: &pb::ChatResponse, id: String) -> Self {
        let choice = response.choices.first();
        let message = choice.and_then(|c| c.message.as_ref());
        let mut content = Vec::new();
        let mut stop_sequence = None;
        let mut refused = false;
        if let Some(message) = message {
            content.extend(message.thinking.iter().map(thinking_out));
            if !message.stop_sequence.is_empty() {
                stop_sequence = Some(message.stop_sequence.clone());
            }
            let text = message.joined_text();
            if !text.is_empty() {
                content.push(BlockOut::Text { text });
            }
            // Anthropic has no refusal field: the refusal is what the model said.
            if !message.refusal.is_empty() {
                refused = true;
                content.push(BlockOut::Text {
                    text: message.refusal.clone(),
                });
            }
            for call in &message.tool_calls {
                content.push(BlockOut::ToolUse {
                    id: tool_id::encode(&call.id, &call.signature),
                    name: call.name.clone(),
                    input: input_of(&call.arguments_json),
                });
            }
        }
        let finish = choice.map_or(pb::FinishReason::Unspecified as i32, |c| c.finish_reason);
        let (stop_reason, closest) = stop_reason_out(
            finish,
            stop_sequence.as_deref().unwrap_or_default(),
            message.is_some_and(|m| !m.tool_calls.is_empty()),
            refused,
        );
        MessageOut {
            id,
            kind: "message",
            role: "assistant",
            model: response.model.clone(),
            content,
            stop_reason,
            stop_sequence,
            usage: usage_out(response.usage.as_ref()),
            switchboard: closest.then(|| crate::openai::FinishDetail {
                finish_detail: finish_detail_str(finish),
            }),
        }
    }
}

// === streaming ===

fn event(name: &'static str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The block being streamed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Text,
    /// A thinking block, by its index among the message's thinking blocks.
    Thinking(u32),
    /// A tool call, by its index among the message's calls.
    Tool(u32),
}

/// Turns pipeline stream events into Anthropic's event sequence.
struct Streamer {
    id: String,
    /// The prompt's tokens as estimated before the provider counted them (see [`Streamer::start`]).
    prompt_estimate: u32,
    started: bool,
    pinged: bool,
    /// The open block and its Anthropic index.
    open: Option<(Open, u32)>,
    next_index: u32,
    finish: i32,
    stop_sequence: String,
    /// The model refused (OpenAI `refusal` pieces came): the stop reason is `refusal`.
    refused: bool,
    /// The answer calls tools (a `tool_use` block was opened).
    calls_tools: bool,
}

impl Streamer {
    fn new(id: String, prompt_estimate: u32) -> Self {
        Streamer {
            id,
            prompt_estimate,
            started: false,
            pinged: false,
            open: None,
            next_index: 0,
            finish: pb::FinishReason::Unspecified as i32,
            stop_sequence: String::new(),
            refused: false,
            calls_tools: false,
        }
    }

    /// `message_start`, with the prompt's input tokens as Anthropic sends them there (clients such
    /// as LangChain read input tokens only from it): the provider's count when the chunk that
    /// starts the message carries usage (`usage`), else an estimate from the request's text
    /// (`prompt_estimate`), since the provider's count usually comes at the end (OpenAI, Gemini,
    /// and the router's Anthropic decoder, which reports `message_start` usage only with the
    /// finish). The exact count is `message_delta`'s usage, which clients take over it.
    fn start(&mut self, model: &str, usage: Option<&pb::Usage>, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        let usage = match usage {
            Some(usage) if usage.prompt_tokens > 0 => UsageOut {
                // Output is counted in message_delta; counting it here too would add it twice.
                output_tokens: 0,
                ..usage_out(Some(usage))
            },
            _ => UsageOut {
                input_tokens: self.prompt_estimate,
                ..UsageOut::default()
            },
        };
        out.push(event(
            "message_start",
            &json!({ "type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage } }),
        ));
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((_, index)) = self.open.take() {
            out.push(event(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": index }),
            ));
        }
    }

    fn open(&mut self, block: Open, content_block: Value, out: &mut Vec<Event>) -> u32 {
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        out.push(event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": index, "content_block": content_block }),
        ));
        self.ping(out);
        self.open = Some((block, index));
        index
    }

    fn ping(&mut self, out: &mut Vec<Event>) {
        if !self.pinged {
            self.pinged = true;
            out.push(event("ping", &json!({ "type": "ping" })));
        }
    }

    fn chunk(&mut self, chunk: &pb::ChatChunk, out: &mut Vec<Event>) {
        self.start(&chunk.model, chunk.usage.as_ref(), out);
        // Anthropic has one choice per message.
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            for piece in &choice.thinking {
                let index = match self.open {
                    Some((Open::Thinking(open), index)) if open == piece.index => index,
                    _ if !piece.redacted_data.is_empty() => {
                        // A redacted block arrives whole, in its start event.
                        self.open(
                            Open::Thinking(piece.index),
                            json!({ "type": "redacted_thinking", "data": piece.redacted_data }),
                            out,
                        );
                        continue;
                    }
                    _ => self.open(
                        Open::Thinking(piece.index),
                        json!({ "type": "thinking", "thinking": "", "signature": "" }),
                        out,
                    ),
                };
                if !piece.text.is_empty() {
                    out.push(event(
                        "content_block_delta",
                        &json!({ "type": "content_block_delta", "index": index,
                                 "delta": { "type": "thinking_delta", "thinking": piece.text } }),
                    ));
                }
                if !piece.signature.is_empty() {
                    out.push(event(
                        "content_block_delta",
                        &json!({ "type": "content_block_delta", "index": index,
                                 "delta": { "type": "signature_delta", "signature": piece.signature } }),
                    ));
                }
            }
            // A refusal is what the model said: text, in the same text block as any content.
            for text in [&choice.content, &choice.refusal] {
                if text.is_empty() {
                    continue;
                }
                let index = match self.open {
                    Some((Open::Text, index)) => index,
                    _ => self.open(Open::Text, json!({ "type": "text", "text": "" }), out),
                };
                out.push(event(
                    "content_block_delta",
                    &json!({ "type": "content_block_delta", "index": index,
                             "delta": { "type": "text_delta", "text": text } }),
                ));
            }
            if !choice.refusal.is_empty() {
                self.refused = true;
            }
            for call in &choice.tool_calls {
                self.calls_tools = true;
                let index = match self.open {
                    Some((Open::Tool(open), index)) if open == call.index => index,
                    _ => self.open(
                        Open::Tool(call.index),
                        json!({ "type": "tool_use", "id": tool_id::encode(&call.id, &call.signature),
                                "name": call.name, "input": {} }),
                        out,
                    ),
                };
                if !call.arguments_delta.is_empty() {
                    out.push(event(
                        "content_block_delta",
                        &json!({ "type": "content_block_delta", "index": index,
                                 "delta": { "type": "input_json_delta", "partial_json": call.arguments_delta } }),
                    ));
                }
            }
            if choice.finish_reason != pb::FinishReason::Unspecified as i32 {
                self.finish = choice.finish_reason;
                self.stop_sequence.clone_from(&choice.stop_sequence);
            }
        }
    }

    /// The stream's end: `message_delta` (stop reason, usage, and as an extra field the
    /// `switchboard` object: who served, after how many attempts, known only now), `message_stop`.
    fn done(
        &mut self,
        model: &str,
        usage: &pb::Usage,
        switchboard: &SwitchboardInfo,
        out: &mut Vec<Event>,
    ) {
        self.start(model, Some(usage), out);
        self.close(out);
        self.ping(out);
        let (stop_reason, closest) = stop_reason_out(
            self.finish,
            &self.stop_sequence,
            self.calls_tools,
            self.refused,
        );
        let mut switchboard = switchboard.clone();
        if closest {
            switchboard.finish_detail = Some(finish_detail_str(self.finish));
        }
        out.push(event(
            "message_delta",
            &json!({ "type": "message_delta",
                     "delta": { "stop_reason": stop_reason,
                                "stop_sequence": (!self.stop_sequence.is_empty()).then_some(&self.stop_sequence) },
                     "usage": usage_out(Some(usage)),
                     "switchboard": &switchboard }),
        ));
        out.push(event("message_stop", &json!({ "type": "message_stop" })));
    }
}

fn error_event(error: &GatewayError) -> Event {
    Event::default().event("error").data(
        serde_json::to_string(&error.anthropic_body()).unwrap_or_else(|_| {
            "{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"stream failed\"}}"
                .to_owned()
        }),
    )
}

/// Anthropic SSE events from the pipeline's stream events.
fn sse_events(
    mut events: crate::pipeline::Events,
    id: String,
    request_id: String,
    cache: &'static str,
    prompt_estimate: u32,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        let mut streamer = Streamer::new(id, prompt_estimate);
        let mut model = String::new();
        let mut out = Vec::new();
        while let Some(item) = events.recv().await {
            match item {
                StreamEvent::Chunk(chunk) => {
                    if model.is_empty() {
                        model.clone_from(&chunk.model);
                    }
                    streamer.chunk(&chunk, &mut out);
                    for event in out.drain(..) {
                        yield Ok(event);
                    }
                }
                StreamEvent::Done { usage, route } => {
                    let switchboard = switchboard_info(&request_id, cache, Some(&route));
                    streamer.done(&model, &usage, &switchboard, &mut out);
                    for event in out.drain(..) {
                        yield Ok(event);
                    }
                    return;
                }
                StreamEvent::Failed(error) => {
                    yield Ok(error_event(&error));
                    return;
                }
            }
        }
        // The pipeline always ends with Done or Failed; anything else is not a clean finish.
        yield Ok(error_event(&GatewayError::Internal("stream ended without its end".to_owned())));
    }
}

/// The prompt's tokens before the provider counted them, for `message_start`: about four
/// characters per token of the messages' text, the rule of the pipeline's usage estimate for
/// answers without usage.
fn estimate_prompt_tokens(request: &pb::ChatRequest) -> u32 {
    let chars: usize = request.messages.iter().map(|m| m.joined_text().len()).sum();
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

// === handler ===

/// An Anthropic-shaped error response.
fn error_response(error: &GatewayError, request_id: Option<&str>) -> Response {
    let response = (error.code().http_status(), Json(error.anthropic_body())).into_response();
    http::with_error_headers(response, error, request_id)
}

/// `POST /v1/messages`.
pub async fn messages(State(shared): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let span = http::request_span("POST /v1/messages", &headers);
    let response = handle(shared, headers, body).instrument(span.clone()).await;
    span.record("http.status_code", response.status().as_u16());
    response
}

async fn handle(shared: Shared, headers: HeaderMap, body: Body) -> Response {
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let principal = match shared
        .keys
        .authenticate_api_key(x_api_key, http::authorization(&headers))
    {
        Ok(principal) => principal,
        Err(error) => return error_response(&error, None),
    };
    let request = match http::read_body(body, shared.max_body_bytes, &headers)
        .await
        .and_then(|bytes| http::parse_json::<MessagesRequest>(&bytes))
    {
        Ok(request) => request,
        Err(error) => return error_response(&error, None),
    };
    let stream = request.stream;
    let request = match request.into_proto() {
        Ok(request) => request,
        Err(error) => return error_response(&error, None),
    };
    let ctx = RequestContext::new(principal);
    let span = tracing::Span::current();
    span.record("request.id", ctx.request_id.as_str());
    span.record("app.id", ctx.principal.app.as_str());
    let control = http::cache_control(&headers);
    let id = message_id(&ctx.request_id);
    if stream {
        let prompt_estimate = estimate_prompt_tokens(&request);
        match shared.pipeline.stream(&ctx, request, control).await {
            Ok(handle) => {
                let events = sse_events(
                    handle.events,
                    id,
                    ctx.request_id.clone(),
                    handle.cache.as_str(),
                    prompt_estimate,
                );
                let mut response = Sse::new(events)
                    .keep_alive(KeepAlive::default())
                    .into_response();
                http::set_headers(
                    response.headers_mut(),
                    &ctx.request_id,
                    handle.cache.as_str(),
                    handle.served_by.as_ref(),
                );
                response
            }
            Err(error) => error_response(&error, Some(&ctx.request_id)),
        }
    } else {
        match shared.pipeline.complete(&ctx, request, control).await {
            Ok(done) => {
                let mut response = Json(MessageOut::from_proto(&done.response, id)).into_response();
                http::set_headers(
                    response.headers_mut(),
                    &ctx.request_id,
                    done.cache.as_str(),
                    Some(&done.route),
                );
                response
            }
            Err(error) => error_response(&error, Some(&ctx.request_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<pb::ChatRequest, GatewayError> {
        http::parse_json::<MessagesRequest>(json.as_bytes())?.into_proto()
    }

    fn field_of(error: GatewayError) -> String {
        match error {
            GatewayError::InvalidRequest { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn translates_a_full_request() {
        let request = parse(
            r#"{"model":"m","max_tokens":64,
              "system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}],
              "messages":[
                {"role":"user","content":[{"type":"text","text":"look"},
                  {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]},
                {"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},
                  {"type":"text","text":"calling"},
                  {"type":"tool_use","id":"toolu_1","name":"f","input":{"a":1}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"42"},
                  {"type":"text","text":"thanks"}]}],
              "tools":[{"name":"f","description":"d","input_schema":{"type":"object"}}],
              "tool_choice":{"type":"any","disable_parallel_tool_use":true},
              "stop_sequences":["END"],"temperature":0.5,"top_p":0.9,"top_k":5,
              "metadata":{"user_id":"u1"},"stream":false}"#,
        )
        .unwrap();
        assert_eq!(request.model, "m");
        let roles: Vec<i32> = request.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                pb::Role::System,
                pb::Role::User,
                pb::Role::Assistant,
                pb::Role::Tool,
                pb::Role::User
            ]
            .map(|r| r as i32)
        );
        assert_eq!(request.messages[0].joined_text(), "be brief");
        assert!(matches!(
            &request.messages[1].content[1].part,
            Some(pb::content_part::Part::ImageUrl(image)) if image.url == "data:image/png;base64,AAAA"
        ));
        assert_eq!(request.messages[2].joined_text(), "calling");
        assert_eq!(
            request.messages[2].tool_calls[0].arguments_json,
            r#"{"a":1}"#
        );
        assert_eq!(request.messages[3].tool_call_id, "toolu_1");
        assert_eq!(request.messages[3].joined_text(), "42");
        assert_eq!(request.messages[4].joined_text(), "thanks");
        assert_eq!(request.tools[0].parameters_json, r#"{"type":"object"}"#);
        assert_eq!(
            request.tool_choice.unwrap().choice,
            Some(pb::tool_choice::Choice::Mode(
                pb::ToolChoiceMode::Required as i32
            ))
        );
        assert_eq!(request.parallel_tool_calls, Some(false));
        let sampling = request.sampling.unwrap();
        assert_eq!(sampling.max_tokens, Some(64));
        assert_eq!(sampling.stop, ["END"]);
        assert_eq!(sampling.temperature, Some(0.5));
        assert_eq!(request.user, "u1");
    }

    #[test]
    fn a_rate_limit_refusal_says_when_to_retry_as_the_openai_face_does() {
        let error = GatewayError::RateLimited {
            scope: "key:k".into(),
            limit: "requests_per_minute",
            limit_value: 40,
            retry_after_secs: 7,
        };
        let response = error_response(&error, Some("req-1"));
        assert_eq!(response.status(), ::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[::http::header::RETRY_AFTER], "7");
        assert_eq!(response.headers()["x-switchboard-request-id"], "req-1");
        // Before the request has an id, the header is still there.
        let response = error_response(&error, None);
        assert_eq!(response.headers()[::http::header::RETRY_AFTER], "7");
        assert!(response.headers().get("x-switchboard-request-id").is_none());
        // Errors that are not rate limits promise nothing.
        let response = error_response(&invalid("model", "bad"), Some("req-1"));
        assert!(
            response
                .headers()
                .get(::http::header::RETRY_AFTER)
                .is_none()
        );
    }

    #[test]
    fn errors_name_the_field() {
        let missing = parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(field_of(missing.unwrap_err()), "max_tokens");
        let role =
            parse(r#"{"model":"m","max_tokens":1,"messages":[{"role":"system","content":"hi"}]}"#);
        assert_eq!(field_of(role.unwrap_err()), "messages[0].role");
        let block = parse(
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#,
        );
        assert_eq!(field_of(block.unwrap_err()), "messages[0].content[0].type");
        let tool_use_by_user = parse(
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_use","id":"a","name":"f","input":{}}]}]}"#,
        );
        assert_eq!(
            field_of(tool_use_by_user.unwrap_err()),
            "messages[0].content[0].type"
        );
        let server_tool = parse(
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
        );
        assert_eq!(field_of(server_tool.unwrap_err()), "tools[0].type");
        let error = GatewayError::InvalidRequest {
            field: "max_tokens".into(),
            message: "Field required".into(),
        };
        let body = serde_json::to_value(error.anthropic_body()).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn response_has_blocks_stop_reason_and_anthropic_usage() {
        let response = pb::ChatResponse {
            model: "m".into(),
            choices: vec![pb::Choice {
                index: 0,
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![text_part("let me check".into())],
                    tool_calls: vec![pb::ToolCall {
                        id: "call_1".into(),
                        name: "f".into(),
                        arguments_json: r#"{"city":"Paris"}"#.into(),
                        signature: String::new(),
                    }],
                    ..Default::default()
                }),
                finish_reason: pb::FinishReason::ToolCalls as i32,
            }],
            usage: Some(pb::Usage {
                prompt_tokens: 100,
                completion_tokens: 7,
                total_tokens: 107,
                cached_prompt_tokens: 30,
                cache_write_tokens: 10,
                reasoning_tokens: 0,
            }),
            ..Default::default()
        };
        let json =
            serde_json::to_value(MessageOut::from_proto(&response, message_id("0a-1b"))).unwrap();
        assert_eq!(json["id"], "msg_0a1b");
        assert_eq!(json["type"], "message");
        assert_eq!(
            json["content"][0],
            json!({"type":"text","text":"let me check"})
        );
        assert_eq!(
            json["content"][1],
            json!({"type":"tool_use","id":"call_1","name":"f","input":{"city":"Paris"}})
        );
        assert_eq!(json["stop_reason"], "tool_use");
        assert!(json["stop_sequence"].is_null());
        assert_eq!(
            json["usage"],
            json!({"input_tokens":60,"output_tokens":7,"cache_creation_input_tokens":10,"cache_read_input_tokens":30})
        );
        for (reason, name) in [
            (pb::FinishReason::Stop, "end_turn"),
            (pb::FinishReason::Length, "max_tokens"),
            (pb::FinishReason::ContentFilter, "refusal"),
        ] {
            assert_eq!(
                stop_reason_out(reason as i32, "", false, false),
                (name, false)
            );
        }
    }

    fn names(events: &[Event]) -> Vec<String> {
        // `Event` has no accessors: read the rendered `event:` line back.
        events
            .iter()
            .map(|e| {
                let text = format!("{e:?}");
                text.split("event: ")
                    .nth(1)
                    .and_then(|rest| rest.split(['\\', '\n']).next())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    fn no_route() -> SwitchboardInfo {
        switchboard_info("req-1", "miss", None)
    }

    #[test]
    fn a_streams_message_delta_says_who_served_after_how_many_attempts() {
        let mut streamer = Streamer::new("msg_1".into(), 0);
        let mut out = Vec::new();
        let route = pb::RouteInfo {
            provider: "openai".into(),
            model: "gpt-4o-mini-2024-07-18".into(),
            target: "openai/gpt-4o-mini".into(),
            attempt_count: 2,
            ..Default::default()
        };
        let switchboard = switchboard_info("req-1", "miss", Some(&route));
        streamer.done("m", &pb::Usage::default(), &switchboard, &mut out);
        assert_eq!(
            names(&out),
            ["message_start", "ping", "message_delta", "message_stop"]
        );
        let delta = data_of(&out[2]);
        assert_eq!(delta["type"], "message_delta");
        assert_eq!(delta["switchboard"]["provider"], "openai");
        assert_eq!(
            delta["switchboard"]["served_model"],
            "gpt-4o-mini-2024-07-18"
        );
        assert_eq!(delta["switchboard"]["attempts"], 2);
        assert_eq!(delta["switchboard"]["request_id"], "req-1");
        assert_eq!(delta["switchboard"]["cache"], "miss");
        // The event's own fields are still there.
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert!(delta["usage"].is_object());
    }

    #[test]
    fn stream_events_follow_anthropics_sequence() {
        let mut streamer = Streamer::new("msg_1".into(), 0);
        let mut out = Vec::new();
        let delta = |content: &str, tool: Option<pb::ToolCallDelta>, finish: pb::FinishReason| {
            pb::ChatChunk {
                model: "m".into(),
                choices: vec![pb::ChoiceDelta {
                    index: 0,
                    content: content.into(),
                    tool_calls: tool.into_iter().collect(),
                    finish_reason: finish as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }
        };
        let unspecified = pb::FinishReason::Unspecified;
        streamer.chunk(&delta("", None, unspecified), &mut out);
        streamer.chunk(&delta("hel", None, unspecified), &mut out);
        streamer.chunk(&delta("lo", None, unspecified), &mut out);
        let call = |id: &str, args: &str| pb::ToolCallDelta {
            index: 0,
            id: id.into(),
            name: if id.is_empty() { "" } else { "f" }.into(),
            arguments_delta: args.into(),
            signature: String::new(),
        };
        streamer.chunk(&delta("", Some(call("c1", "")), unspecified), &mut out);
        streamer.chunk(&delta("", Some(call("", "{\"a\":")), unspecified), &mut out);
        streamer.chunk(
            &delta("", Some(call("", "1}")), pb::FinishReason::ToolCalls),
            &mut out,
        );
        streamer.done("m", &pb::Usage::default(), &no_route(), &mut out);
        assert_eq!(
            names(&out),
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let rendered = format!("{:?}", out[10]);
        assert!(rendered.contains("tool_use"), "{rendered}");
    }

    #[test]
    fn a_strict_tool_stays_strict() {
        let request = parse(
            r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"hi"}],
              "tools":[
                {"name":"exact","input_schema":{"type":"object"},"strict":true},
                {"name":"loose","input_schema":{"type":"object"},"strict":null},
                {"name":"plain","input_schema":{"type":"object"}}]}"#,
        )
        .unwrap();
        let strict: Vec<(&str, bool)> = request
            .tools
            .iter()
            .map(|t| (t.name.as_str(), t.strict))
            .collect();
        assert_eq!(
            strict,
            [("exact", true), ("loose", false), ("plain", false)]
        );
    }

    #[test]
    fn thinking_blocks_tool_errors_and_top_k_are_kept_on_input() {
        let request = parse(
            r#"{"model":"m","max_tokens":4096,"top_k":12,
              "thinking":{"type":"enabled","budget_tokens":2000},
              "messages":[
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":[
                  {"type":"thinking","thinking":"call the tool","signature":"Sig=="},
                  {"type":"redacted_thinking","data":"Red=="},
                  {"type":"tool_use","id":"toolu_1","name":"f","input":{}}]},
                {"role":"user","content":[
                  {"type":"tool_result","tool_use_id":"toolu_1","content":"down","is_error":true}]},
                {"role":"assistant","content":[{"type":"thinking","thinking":"only","signature":"S2"}]}]}"#,
        )
        .unwrap();
        assert_eq!(request.sampling.unwrap().top_k, Some(12));
        assert_eq!(
            request.thinking,
            Some(pb::ThinkingConfig {
                enabled: true,
                budget_tokens: 2000,
                ..Default::default()
            })
        );
        let assistant = &request.messages[1];
        assert_eq!(
            assistant.thinking,
            vec![
                pb::ThinkingBlock {
                    text: "call the tool".into(),
                    signature: "Sig==".into(),
                    redacted_data: String::new(),
                },
                pb::ThinkingBlock {
                    redacted_data: "Red==".into(),
                    ..Default::default()
                },
            ]
        );
        // Thinking is never content.
        assert!(assistant.content.is_empty());
        assert_eq!(assistant.tool_calls[0].id, "toolu_1");
        let tool = &request.messages[2];
        assert_eq!(tool.role, pb::Role::Tool as i32);
        assert!(tool.tool_error);
        assert_eq!(tool.joined_text(), "down");
        // A turn with nothing but thinking is kept.
        assert_eq!(request.messages[3].thinking[0].signature, "S2");
        let plain = parse(
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[
                {"type":"tool_result","tool_use_id":"t","content":"ok"}]}]}"#,
        )
        .unwrap();
        assert!(!plain.messages[0].tool_error);
        assert_eq!(plain.sampling.unwrap().top_k, None);
        assert_eq!(plain.thinking, None);
        let off = parse(
            r#"{"model":"m","max_tokens":1,"thinking":{"type":"disabled"},"messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(off.thinking, Some(pb::ThinkingConfig::default()));
        for (body, field) in [
            (
                r#"{"model":"m","max_tokens":1,"thinking":{"type":"enabled"},"messages":[{"role":"user","content":"x"}]}"#,
                "thinking.enabled.budget_tokens",
            ),
            (
                r#"{"model":"m","max_tokens":1,"thinking":{"type":"sometimes"},"messages":[{"role":"user","content":"x"}]}"#,
                "thinking.type",
            ),
        ] {
            assert_eq!(field_of(parse(body).unwrap_err()), field);
        }
    }

    #[test]
    fn response_returns_thinking_blocks_first_and_the_stop_sequence() {
        let response = pb::ChatResponse {
            model: "m".into(),
            choices: vec![pb::Choice {
                index: 0,
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![text_part("done".into())],
                    thinking: vec![
                        pb::ThinkingBlock {
                            text: "hm".into(),
                            signature: "Sig==".into(),
                            redacted_data: String::new(),
                        },
                        pb::ThinkingBlock {
                            redacted_data: "Red==".into(),
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
        let json = serde_json::to_value(MessageOut::from_proto(&response, "msg_1".into())).unwrap();
        assert_eq!(
            json["content"],
            json!([
                {"type":"thinking","thinking":"hm","signature":"Sig=="},
                {"type":"redacted_thinking","data":"Red=="},
                {"type":"text","text":"done"}
            ])
        );
        assert_eq!(json["stop_reason"], "stop_sequence");
        assert_eq!(json["stop_sequence"], "END");
        // Without a reported sequence a stop is end_turn.
        let mut plain = response.clone();
        if let Some(message) = plain.choices[0].message.as_mut() {
            message.stop_sequence.clear();
        }
        let json = serde_json::to_value(MessageOut::from_proto(&plain, "msg_1".into())).unwrap();
        assert_eq!(json["stop_reason"], "end_turn");
        assert!(json["stop_sequence"].is_null());
    }

    /// The `data:` JSON of a rendered event.
    fn data_of(event: &Event) -> Value {
        let text = format!("{event:?}");
        let start = text.find("data: ").unwrap() + "data: ".len();
        let rest = &text[start..];
        // The Debug form escapes quotes and backslashes; undo that for the JSON.
        let end = rest.find("\\n").unwrap_or(rest.len());
        let data = rest[..end].replace("\\\"", "\"").replace("\\\\", "\\");
        serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"))
    }

    #[test]
    fn stream_carries_thinking_blocks_signatures_and_the_stop_sequence() {
        let mut streamer = Streamer::new("msg_1".into(), 0);
        let mut out = Vec::new();
        let thinking = |index: u32, text: &str, signature: &str, redacted: &str| pb::ChatChunk {
            model: "m".into(),
            choices: vec![pb::ChoiceDelta {
                thinking: vec![pb::ThinkingDelta {
                    index,
                    text: text.into(),
                    signature: signature.into(),
                    redacted_data: redacted.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        streamer.chunk(&thinking(0, "", "", ""), &mut out);
        streamer.chunk(&thinking(0, "let me ", "", ""), &mut out);
        streamer.chunk(&thinking(0, "think", "", ""), &mut out);
        streamer.chunk(&thinking(0, "", "Sig==", ""), &mut out);
        streamer.chunk(&thinking(1, "", "", "Red=="), &mut out);
        streamer.chunk(
            &pb::ChatChunk {
                model: "m".into(),
                choices: vec![pb::ChoiceDelta {
                    content: "done".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            &mut out,
        );
        streamer.chunk(
            &pb::ChatChunk {
                model: "m".into(),
                choices: vec![pb::ChoiceDelta {
                    finish_reason: pb::FinishReason::Stop as i32,
                    stop_sequence: "END".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            &mut out,
        );
        streamer.done("m", &pb::Usage::default(), &no_route(), &mut out);
        let data: Vec<Value> = out.iter().map(data_of).collect();
        let starts: Vec<&Value> = data
            .iter()
            .filter(|d| d["type"] == "content_block_start")
            .map(|d| &d["content_block"])
            .collect();
        assert_eq!(
            starts,
            [
                &json!({"type":"thinking","thinking":"","signature":""}),
                &json!({"type":"redacted_thinking","data":"Red=="}),
                &json!({"type":"text","text":""}),
            ]
        );
        let deltas: Vec<(u64, &Value)> = data
            .iter()
            .filter(|d| d["type"] == "content_block_delta")
            .map(|d| (d["index"].as_u64().unwrap(), &d["delta"]))
            .collect();
        assert_eq!(
            deltas,
            [
                (0, &json!({"type":"thinking_delta","thinking":"let me "})),
                (0, &json!({"type":"thinking_delta","thinking":"think"})),
                (0, &json!({"type":"signature_delta","signature":"Sig=="})),
                (2, &json!({"type":"text_delta","text":"done"})),
            ]
        );
        let stops = data
            .iter()
            .filter(|d| d["type"] == "content_block_stop")
            .count();
        assert_eq!(stops, 3);
        let message_delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
        assert_eq!(message_delta["delta"]["stop_reason"], "stop_sequence");
        assert_eq!(message_delta["delta"]["stop_sequence"], "END");
    }

    #[test]
    fn gemini_call_signatures_ride_in_tool_use_ids_both_ways() {
        let signature = "fake/thought+sig00AA==";
        let shown = crate::tool_id::encode("call_0", signature);
        assert_ne!(shown, "call_0");
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
        let json = serde_json::to_value(MessageOut::from_proto(&response, "msg_1".into())).unwrap();
        assert_eq!(json["content"][0]["id"], shown.as_str());
        assert_eq!(json["content"][1]["id"], "call_1");

        // Next turn: tool_use and tool_result ids are split back; the signature is on the call.
        let request = parse(&format!(
            r#"{{"model":"m","max_tokens":10,"messages":[
                {{"role":"user","content":"weather?"}},
                {{"role":"assistant","content":[
                  {{"type":"tool_use","id":"{shown}","name":"f","input":{{}}}},
                  {{"type":"tool_use","id":"call_1","name":"f","input":{{}}}}]}},
                {{"role":"user","content":[
                  {{"type":"tool_result","tool_use_id":"{shown}","content":"sunny"}},
                  {{"type":"tool_result","tool_use_id":"call_1","content":"warm"}}]}}]}}"#
        ))
        .unwrap();
        let calls = &request.messages[1].tool_calls;
        assert_eq!(
            (calls[0].id.as_str(), calls[0].signature.as_str()),
            ("call_0", signature)
        );
        assert_eq!(
            (calls[1].id.as_str(), calls[1].signature.as_str()),
            ("call_1", "")
        );
        assert_eq!(request.messages[2].tool_call_id, "call_0");
        assert_eq!(request.messages[3].tool_call_id, "call_1");

        // Streamed: the content_block_start of the call shows the same id.
        let mut streamer = Streamer::new("msg_1".into(), 0);
        let mut out = Vec::new();
        streamer.chunk(
            &pb::ChatChunk {
                model: "m".into(),
                choices: vec![pb::ChoiceDelta {
                    tool_calls: vec![pb::ToolCallDelta {
                        index: 0,
                        id: "call_0".into(),
                        name: "f".into(),
                        arguments_delta: "{}".into(),
                        signature: signature.into(),
                    }],
                    finish_reason: pb::FinishReason::ToolCalls as i32,
                    ..Default::default()
                }],
                ..Default::default()
            },
            &mut out,
        );
        streamer.done("m", &pb::Usage::default(), &no_route(), &mut out);
        let start = out
            .iter()
            .map(data_of)
            .find(|d| d["type"] == "content_block_start")
            .unwrap();
        assert_eq!(
            start["content_block"],
            json!({"type":"tool_use","id":shown,"name":"f","input":{}})
        );
    }

    #[test]
    fn null_is_an_absent_field() {
        // What hand-built dicts and SDK defaults send: every optional field as `null`.
        let request = parse(
            r#"{"model":"m","max_tokens":16,"system":null,"tools":null,"tool_choice":null,
              "stop_sequences":null,"temperature":null,"top_p":null,"top_k":null,
              "metadata":null,"thinking":null,"stream":null,"service_tier":null,
              "mcp_servers":null,"container":null,"output_format":null,"output_config":null,
              "messages":[
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":[
                  {"type":"thinking","thinking":"hm","signature":null},
                  {"type":"redacted_thinking","data":null},
                  {"type":"tool_use","id":"toolu_1","name":"f","input":null}]},
                {"role":"user","content":[
                  {"type":"tool_result","tool_use_id":"toolu_1","content":null,"is_error":null},
                  {"type":"text","text":"thanks"}]}]}"#,
        )
        .unwrap();
        assert_eq!(request.messages.len(), 4, "no system message");
        assert!(request.tools.is_empty() && request.tool_choice.is_none());
        assert!(request.thinking.is_none());
        let sampling = request.sampling.unwrap();
        assert!(sampling.stop.is_empty());
        assert_eq!(sampling.temperature, None);
        assert_eq!(request.user, "");
        let assistant = &request.messages[1];
        assert_eq!(assistant.thinking[0].signature, "");
        assert_eq!(assistant.tool_calls[0].arguments_json, "{}");
        assert!(!request.messages[2].tool_error);
        let stream = http::parse_json::<MessagesRequest>(
            br#"{"model":"m","max_tokens":1,"stream":null,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert!(!stream.stream);

        // Inside objects too.
        let request = parse(
            r#"{"model":"m","max_tokens":16,"metadata":{"user_id":null},
              "tools":[{"name":"f","description":null,"input_schema":{"type":"object"},"type":null}],
              "tool_choice":{"type":"auto","disable_parallel_tool_use":null},
              "thinking":{"type":"enabled","budget_tokens":1024},
              "messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(request.tools[0].description, "");
        assert_eq!(request.parallel_tool_calls, None);
        assert_eq!(request.user, "");
    }

    #[test]
    fn features_switchboard_lacks_are_refused_by_name_and_hints_ignored() {
        let with = |extra: &str| {
            parse(&format!(
                r#"{{"model":"m","max_tokens":16,{extra},"messages":[{{"role":"user","content":"x"}}]}}"#
            ))
        };
        for (extra, param) in [
            (
                r#""mcp_servers":[{"type":"url","url":"https://mcp.example/sse","name":"x"}]"#,
                "mcp_servers",
            ),
            (r#""container":"container_011""#, "container"),
            (
                r#""output_format":{"type":"json_schema","schema":{"type":"object"}}"#,
                "output_format",
            ),
            (
                r#""output_config":{"format":{"type":"json_schema","schema":{"type":"object"}}}"#,
                "output_config.format",
            ),
        ] {
            match with(extra).unwrap_err() {
                GatewayError::InvalidRequest { field, message } => {
                    assert_eq!(field, param, "{extra}");
                    assert!(
                        message.contains("Switchboard does not support"),
                        "{message}"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Neutral values and hints about serving pass.
        for extra in [
            r#""mcp_servers":[]"#,
            r#""output_config":{"effort":"low","format":null}"#,
            r#""service_tier":"auto""#,
            r#""context_management":{"edits":[]}"#,
        ] {
            assert!(with(extra).is_ok(), "{extra}");
        }
    }

    #[test]
    fn stop_reasons_are_anthropics_and_say_when_only_the_closest() {
        let answer = |finish: pb::FinishReason, calls: bool| pb::ChatResponse {
            choices: vec![pb::Choice {
                message: Some(pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![text_part("partial".into())],
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
            serde_json::to_value(MessageOut::from_proto(response, "msg_1".into())).unwrap()
        };
        // A provider error (Gemini MALFORMED_FUNCTION_CALL) is not a finished turn.
        let broken = json(&answer(pb::FinishReason::Error, false));
        assert_eq!(broken["stop_reason"], "max_tokens");
        assert_eq!(broken["switchboard"]["finish_detail"], "error");
        // No reason: what the answer shows.
        let calls = json(&answer(pb::FinishReason::Unspecified, true));
        assert_eq!(calls["stop_reason"], "tool_use");
        assert_eq!(calls["switchboard"]["finish_detail"], "unspecified");
        let text = json(&answer(pb::FinishReason::Unspecified, false));
        assert_eq!(text["stop_reason"], "end_turn");
        // A standard reason has no detail.
        let done = json(&answer(pb::FinishReason::Stop, false));
        assert_eq!(done["stop_reason"], "end_turn");
        assert!(done.get("switchboard").is_none(), "{done}");

        // Streamed: the same in message_delta, the detail in its `switchboard` object.
        let streamed = |finish: pb::FinishReason, calls: bool| {
            let mut streamer = Streamer::new("msg_1".into(), 0);
            let mut out = Vec::new();
            streamer.chunk(
                &pb::ChatChunk {
                    model: "m".into(),
                    choices: vec![pb::ChoiceDelta {
                        content: "partial".into(),
                        tool_calls: if calls {
                            vec![pb::ToolCallDelta {
                                index: 0,
                                id: "c1".into(),
                                name: "f".into(),
                                arguments_delta: "{}".into(),
                                signature: String::new(),
                            }]
                        } else {
                            Vec::new()
                        },
                        finish_reason: finish as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                &mut out,
            );
            streamer.done("m", &pb::Usage::default(), &no_route(), &mut out);
            out.iter()
                .map(data_of)
                .find(|d| d["type"] == "message_delta")
                .unwrap()
        };
        let broken = streamed(pb::FinishReason::Error, false);
        assert_eq!(broken["delta"]["stop_reason"], "max_tokens");
        assert_eq!(broken["switchboard"]["finish_detail"], "error");
        assert_eq!(broken["switchboard"]["request_id"], "req-1");
        let calls = streamed(pb::FinishReason::Unspecified, true);
        assert_eq!(calls["delta"]["stop_reason"], "tool_use");
        assert_eq!(calls["switchboard"]["finish_detail"], "unspecified");
        let done = streamed(pb::FinishReason::Stop, false);
        assert_eq!(done["delta"]["stop_reason"], "end_turn");
        assert!(done["switchboard"].get("finish_detail").is_none());
    }

    #[test]
    fn message_start_carries_the_prompts_input_tokens() {
        let request = parse(
            r#"{"model":"m","max_tokens":16,"system":"be brief",
              "messages":[{"role":"user","content":"hello world!"}]}"#,
        )
        .unwrap();
        // 8 + 12 characters, four to a token.
        assert_eq!(estimate_prompt_tokens(&request), 5);

        let start_usage = |usage: Option<pb::Usage>| {
            let mut streamer = Streamer::new("msg_1".into(), 5);
            let mut out = Vec::new();
            streamer.chunk(
                &pb::ChatChunk {
                    model: "m".into(),
                    choices: vec![pb::ChoiceDelta {
                        role: pb::Role::Assistant as i32,
                        ..Default::default()
                    }],
                    usage,
                    ..Default::default()
                },
                &mut out,
            );
            let start = data_of(&out[0]);
            assert_eq!(start["type"], "message_start");
            start["message"]["usage"].clone()
        };
        // The provider has not counted yet: the estimate.
        assert_eq!(
            start_usage(None),
            json!({"input_tokens":5,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0})
        );
        // The first chunk carries the provider's count: that, as Anthropic counts input.
        assert_eq!(
            start_usage(Some(pb::Usage {
                prompt_tokens: 100,
                completion_tokens: 1,
                cached_prompt_tokens: 30,
                ..Default::default()
            })),
            json!({"input_tokens":70,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":30})
        );
    }
}
