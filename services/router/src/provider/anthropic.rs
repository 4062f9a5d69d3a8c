//! Translation between `switchboard.chat.v1` and the Anthropic Messages wire format
//! (`POST /v1/messages`, API version `2023-06-01`).
//!
//! Requests: system and developer messages become the top-level `system`; tool results become
//! `tool_result` blocks of a user turn; consecutive turns of the same role are merged (Anthropic
//! wants tool results of one assistant turn in one user turn). `max_tokens` is required by
//! Anthropic: the request's, else the provider's `default_max_tokens`. JSON mode has no Anthropic
//! parameter: it is emulated by an instruction appended to `system` (with the schema for
//! `JSON_SCHEMA`). `top_k` is sent as `top_k`. With both `temperature` and `top_p` set, only
//! `temperature` is sent (recent Claude models reject the pair). Not expressible and ignored: `seed`,
//! `presence_penalty`, `frequency_penalty`, `Tool.strict`; `n > 1` is rejected. A tool message's
//! `tool_error` is the `tool_result`'s `is_error: true`.
//!
//! Extended thinking: `ChatRequest.thinking` is `thinking` (`enabled` with `budget_tokens`, or
//! `disabled`; with no budget, an OpenAI-style `effort` picks it: low 1,024, medium 2,048, high
//! 4,096; never below Anthropic's minimum 1,024). Thinking counts within `max_tokens`, which must
//! exceed the budget: without a client `max_tokens` it is the budget plus `default_max_tokens`;
//! with one, the budget is clamped below it, and no thinking block is sent when that leaves less
//! than 1,024. Thinking is left out the same way where Anthropic would reject it: in a tool loop
//! (the last user turn holds tool results) whose last assistant turn does not start with a signed
//! thinking block, and when the budget comes from an effort (the OpenAI face) while `tool_choice`
//! forces a tool. An assistant message's `thinking` blocks are sent back first in its turn,
//! unchanged (`thinking` + `signature`, or `redacted_thinking` + `data`), as Anthropic requires
//! in the turn after a tool call. A block with neither a signature nor redacted data is not sent:
//! Anthropic could not verify it and would reject the request (it came from another provider,
//! such as Gemini thought summaries or an OpenAI-compatible server's `reasoning_content`, or its
//! signature was dropped on the way). A tool call's `signature` (Gemini's) is not sent. Answers carry them the other way: `thinking` /
//! `redacted_thinking` content blocks become `Message.thinking`; in streams `thinking_delta` and
//! `signature_delta` become `ChoiceDelta.thinking` pieces (a redacted block arrives whole at its
//! `content_block_start`).
//!
//! An assistant message's `refusal` (OpenAI's) is sent as a text block after its content, so that
//! a refusal-only turn is not dropped.
//!
//! Stop reasons: `stop_sequence` is FINISH_REASON_STOP with the matched sequence in
//! `Message.stop_sequence` (streams: `ChoiceDelta.stop_sequence` on the finishing delta).
//!
//! Usage: Anthropic's `input_tokens` excludes cache reads and writes; ours includes them
//! (`prompt_tokens = input + cache_read + cache_creation`, `cached_prompt_tokens = cache_read`,
//! `cache_write_tokens = cache_creation`).

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_proto::chat::v1::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, ContentPart, FinishReason, Message,
    ResponseFormatType, Role, ThinkingBlock, ThinkingDelta, ToolCall, ToolCallDelta,
    ToolChoiceMode, Usage, content_part::Part, tool_choice::Choice as ToolChoiceKind,
};

use super::{
    Decoded, ProviderError, StreamDecoder,
    openai::{TranslateError, content_values, invalid, parse_json_text, tool_arguments},
    sse::SseEvent,
};

/// The `anthropic-version` header sent unless the provider configures another.
pub const API_VERSION: &str = "2023-06-01";

/// The instruction that asks for JSON (Anthropic has no JSON mode parameter).
const JSON_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else: no prose, no Markdown code fences.";

fn text_of(message: &Message) -> String {
    message
        .content
        .iter()
        .filter_map(|p| match &p.part {
            Some(Part::Text(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An image part as an Anthropic image block: `data:` URLs inline (base64), others by URL.
fn image_block(url: &str, field: &str) -> Result<Value, TranslateError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| invalid(field, "a data: URL needs a `,`"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| invalid(field, "only base64 data: URLs are supported"))?;
        return Ok(json!({ "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data } }));
    }
    Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }))
}

fn content_blocks(message: &Message, field: &str) -> Result<Vec<Value>, TranslateError> {
    content_values(
        message,
        field,
        |text| json!({ "type": "text", "text": text }),
        image_block,
    )
}

fn system_text(request: &ChatRequest) -> Result<String, TranslateError> {
    let mut parts: Vec<String> = request
        .messages
        .iter()
        .filter(|m| matches!(Role::try_from(m.role), Ok(Role::System | Role::Developer)))
        .map(text_of)
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(format) = &request.response_format {
        match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::JsonObject) => parts.push(JSON_INSTRUCTION.to_owned()),
            Ok(ResponseFormatType::JsonSchema) => {
                let mut text = JSON_INSTRUCTION.to_owned();
                if !format.json_schema_json.trim().is_empty() {
                    let schema = parse_json_text(
                        &format.json_schema_json,
                        "response_format.json_schema_json",
                    )?;
                    text.push_str(" The object must follow this JSON Schema");
                    if !format.schema_name.is_empty() {
                        text.push_str(&format!(" (\"{}\")", format.schema_name));
                    }
                    text.push_str(&format!(": {schema}"));
                }
                parts.push(text);
            }
            _ => {}
        }
    }
    Ok(parts.join("\n\n"))
}

/// A thinking block as Anthropic sent it: `redacted_thinking` when it has redacted data. None for
/// a block with neither a signature nor redacted data, which Anthropic cannot verify (it did not
/// come from Anthropic).
fn thinking_block(block: &ThinkingBlock) -> Option<Value> {
    if !block.redacted_data.is_empty() {
        Some(json!({ "type": "redacted_thinking", "data": block.redacted_data }))
    } else if !block.signature.is_empty() {
        Some(json!({ "type": "thinking", "thinking": block.text, "signature": block.signature }))
    } else {
        None
    }
}

/// The Anthropic Messages body for `request` sent to `model`. `tags` are never sent.
pub fn to_anthropic_request(
    model: &str,
    request: &ChatRequest,
    stream: bool,
    default_max_tokens: u32,
) -> Result<Value, TranslateError> {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    let system = system_text(request)?;
    if !system.is_empty() {
        body.insert("system".into(), json!(system));
    }

    // (role, blocks) turns, consecutive same-role turns merged.
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in request.messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let (role, blocks) = match Role::try_from(message.role) {
            Ok(Role::System | Role::Developer) => continue,
            Ok(Role::User) => ("user", content_blocks(message, &field)?),
            Ok(Role::Assistant) => {
                // Thinking blocks come first in the turn, exactly as Anthropic sent them; unsigned
                // ones (from another provider) are left out.
                let mut blocks: Vec<Value> =
                    message.thinking.iter().filter_map(thinking_block).collect();
                blocks.extend(content_blocks(message, &field)?);
                // A refusal (OpenAI's) is what the model said: it goes as text, not lost.
                if !message.refusal.is_empty() {
                    blocks.push(json!({ "type": "text", "text": message.refusal }));
                }
                for (j, call) in message.tool_calls.iter().enumerate() {
                    blocks.push(json!({
                        "type": "tool_use", "id": call.id, "name": call.name,
                        "input": tool_arguments(&call.arguments_json, &format!("{field}.tool_calls[{j}].arguments_json"))?,
                    }));
                }
                ("assistant", blocks)
            }
            Ok(Role::Tool) => {
                if message.tool_call_id.is_empty() {
                    return Err(invalid(
                        format!("{field}.tool_call_id"),
                        "a tool message must name the call it answers",
                    ));
                }
                let mut result = Map::new();
                result.insert("type".into(), json!("tool_result"));
                result.insert("tool_use_id".into(), json!(message.tool_call_id));
                if message.tool_error {
                    result.insert("is_error".into(), json!(true));
                }
                let parts = content_blocks(message, &field)?;
                let only_text = parts.iter().all(|b| b["type"] == "text");
                if only_text && !parts.is_empty() {
                    result.insert("content".into(), json!(text_of(message)));
                } else if !parts.is_empty() {
                    result.insert("content".into(), Value::Array(parts));
                }
                ("user", vec![Value::Object(result)])
            }
            Ok(Role::Unspecified) | Err(_) => {
                return Err(invalid(format!("{field}.role"), "role must be set"));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let thinking_fits_history = thinking_fits_history(&turns);
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    body.insert("messages".into(), Value::Array(messages));

    let sampling = request.sampling.clone().unwrap_or_default();
    if sampling.n.is_some_and(|n| n > 1) {
        return Err(invalid(
            "sampling.n",
            "Anthropic generates one choice per request",
        ));
    }
    // Thinking is left out (as when `max_tokens` leaves no room for it) where Anthropic would
    // reject it with a 400 that stops the route: in a tool loop whose last assistant turn does not
    // start with a signed thinking block, and when thinking the adapter derived from an
    // OpenAI-style effort meets a `tool_choice` that forces a tool (OpenAI takes that pair).
    let forced_tool = request
        .tool_choice
        .as_ref()
        .and_then(|c| c.choice.as_ref())
        .is_some_and(|choice| match choice {
            ToolChoiceKind::Mode(mode) => *mode == ToolChoiceMode::Required as i32,
            ToolChoiceKind::FunctionName(_) => true,
        });
    let effort_derived = request
        .thinking
        .as_ref()
        .is_some_and(|t| t.budget_tokens == 0 && !t.effort.is_empty());
    let thinking_allowed = thinking_fits_history && !(forced_tool && effort_derived);
    let (max_tokens, thinking) = max_tokens_and_thinking(
        sampling.max_tokens,
        request.thinking.as_ref(),
        default_max_tokens,
        thinking_allowed,
    );
    body.insert("max_tokens".into(), json!(max_tokens));
    if !sampling.stop.is_empty() {
        body.insert("stop_sequences".into(), json!(sampling.stop));
    }
    if let Some(temperature) = sampling.temperature {
        body.insert("temperature".into(), json!(temperature));
    }
    // Recent Claude models (Sonnet 4.5, Haiku 4.5, Opus 4.1 and later) reject `temperature` and
    // `top_p` together; OpenAI clients often send both (`top_p: 1`): temperature wins.
    if let Some(top_p) = sampling.top_p.filter(|_| sampling.temperature.is_none()) {
        body.insert("top_p".into(), json!(top_p));
    }
    if let Some(top_k) = sampling.top_k {
        body.insert("top_k".into(), json!(top_k));
    }

    if !request.tools.is_empty() {
        let mut tools = Vec::with_capacity(request.tools.len());
        for (i, tool) in request.tools.iter().enumerate() {
            let mut out = Map::new();
            out.insert("name".into(), json!(tool.name));
            if !tool.description.is_empty() {
                out.insert("description".into(), json!(tool.description));
            }
            let schema = if tool.parameters_json.trim().is_empty() {
                json!({ "type": "object", "properties": {} })
            } else {
                parse_json_text(
                    &tool.parameters_json,
                    &format!("tools[{i}].parameters_json"),
                )?
            };
            out.insert("input_schema".into(), schema);
            tools.push(Value::Object(out));
        }
        body.insert("tools".into(), Value::Array(tools));
    }
    let mut tool_choice = request
        .tool_choice
        .as_ref()
        .and_then(|c| c.choice.as_ref())
        .and_then(|choice| match choice {
            ToolChoiceKind::Mode(mode) => match ToolChoiceMode::try_from(*mode) {
                Ok(ToolChoiceMode::None) => Some(json!({ "type": "none" })),
                Ok(ToolChoiceMode::Auto) => Some(json!({ "type": "auto" })),
                Ok(ToolChoiceMode::Required) => Some(json!({ "type": "any" })),
                Ok(ToolChoiceMode::Unspecified) | Err(_) => None,
            },
            ToolChoiceKind::FunctionName(name) => Some(json!({ "type": "tool", "name": name })),
        });
    if request.parallel_tool_calls == Some(false) && !request.tools.is_empty() {
        let choice = tool_choice.get_or_insert_with(|| json!({ "type": "auto" }));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
    }
    if let Some(choice) = tool_choice {
        body.insert("tool_choice".into(), choice);
    }
    if !request.user.is_empty() {
        body.insert("metadata".into(), json!({ "user_id": request.user }));
    }
    if let Some(thinking) = thinking {
        body.insert("thinking".into(), thinking);
    }
    if stream {
        body.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(body))
}

/// Whether thinking may be on for these turns. With thinking enabled, Anthropic requires the
/// last assistant turn of a tool loop (the conversation ends with a user turn holding
/// `tool_result`s) to start with a `thinking` / `redacted_thinking` block, and answers 400
/// otherwise. Such a turn has none when its call came through a format that cannot carry
/// Anthropic's signed blocks (the OpenAI face) or from another provider (unsigned blocks are not
/// sent back).
fn thinking_fits_history(turns: &[(&'static str, Vec<Value>)]) -> bool {
    let Some(((last_role, last), earlier)) = turns.split_last() else {
        return true;
    };
    let in_tool_loop =
        *last_role == "user" && last.iter().any(|block| block["type"] == "tool_result");
    if !in_tool_loop {
        return true;
    }
    earlier
        .iter()
        .rev()
        .find(|(role, _)| *role == "assistant")
        .and_then(|(_, blocks)| blocks.first())
        .is_some_and(|first| {
            matches!(
                first["type"].as_str(),
                Some("thinking" | "redacted_thinking")
            )
        })
}

/// Anthropic's smallest thinking budget (`budget_tokens` >= 1,024).
const MIN_THINKING_BUDGET: u32 = 1024;

/// `max_tokens` and the `thinking` block (if any) of a request that sets `max_tokens` (or not)
/// and asks for `thinking`. Anthropic counts thinking within `max_tokens` and requires
/// `max_tokens > budget_tokens >= 1,024`:
/// - no `max_tokens` from the client: the budget (at least 1,024) plus `default_max_tokens`, so
///   that the visible answer keeps the room it has without thinking;
/// - the client's `max_tokens`: kept (it bounds what the client pays for), the budget clamped to
///   `max_tokens - 1`; when that leaves less than 1,024 no thinking block is sent at all, since
///   Anthropic would reject the request (400, and the route would stop) and the answer is worth
///   more than its reasoning. Thinking off is sent as `disabled` whatever `max_tokens` is.
///
/// Thinking asked but not `allowed` (Anthropic would reject it with this request) is left out the
/// same way, `max_tokens` as without thinking.
fn max_tokens_and_thinking(
    max_tokens: Option<u32>,
    thinking: Option<&switchboard_proto::chat::v1::ThinkingConfig>,
    default_max_tokens: u32,
    allowed: bool,
) -> (u32, Option<Value>) {
    let Some(thinking) = thinking.filter(|t| allowed || !t.enabled) else {
        return (max_tokens.unwrap_or(default_max_tokens), None);
    };
    if !thinking.enabled {
        return (
            max_tokens.unwrap_or(default_max_tokens),
            Some(json!({ "type": "disabled" })),
        );
    }
    let budget = super::thinking_budget(thinking).max(MIN_THINKING_BUDGET);
    let enabled = |budget: u32| Some(json!({ "type": "enabled", "budget_tokens": budget }));
    match max_tokens {
        None => (budget.saturating_add(default_max_tokens), enabled(budget)),
        Some(max) => {
            let budget = budget.min(max.saturating_sub(1));
            if budget >= MIN_THINKING_BUDGET {
                (max, enabled(budget))
            } else {
                (max, None)
            }
        }
    }
}

// === responses ===

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(default)]
struct AnUsage {
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    cache_creation_input_tokens: Option<u32>,
    cache_read_input_tokens: Option<u32>,
}

impl AnUsage {
    /// Fields present in `newer` replace ours (`message_delta` usage is cumulative).
    fn update(&mut self, newer: &AnUsage) {
        let keep = |old: &mut Option<u32>, new: Option<u32>| {
            if new.is_some() {
                *old = new;
            }
        };
        keep(&mut self.input_tokens, newer.input_tokens);
        keep(&mut self.output_tokens, newer.output_tokens);
        keep(
            &mut self.cache_creation_input_tokens,
            newer.cache_creation_input_tokens,
        );
        keep(
            &mut self.cache_read_input_tokens,
            newer.cache_read_input_tokens,
        );
    }

    fn to_usage(self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let write = self.cache_creation_input_tokens.unwrap_or(0);
        let prompt = self.input_tokens.unwrap_or(0) + read + write;
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_prompt_tokens: read,
            reasoning_tokens: 0,
            cache_write_tokens: write,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct AnMessage {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    model: String,
    content: Vec<Value>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: Option<AnUsage>,
}

/// Maps an Anthropic stop reason.
pub fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("end_turn" | "stop_sequence" | "pause_turn") => FinishReason::Stop,
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        _ => FinishReason::Unspecified,
    }
}

/// The matched stop sequence, kept only when it is why generation stopped.
fn stop_sequence_of(reason: Option<&str>, sequence: Option<&str>) -> String {
    match (reason, sequence) {
        (Some("stop_sequence"), Some(sequence)) => sequence.to_owned(),
        _ => String::new(),
    }
}

/// Parses a Messages response (`"type": "message"`); `created` is stamped (Anthropic sends none).
pub fn parse_response(body: &[u8], created: i64) -> Result<ChatResponse, ProviderError> {
    let value: Value = serde_json::from_slice(body).map_err(ProviderError::malformed)?;
    if value.get("type").and_then(Value::as_str) == Some("error") || value.get("error").is_some() {
        return Err(ProviderError::from_error_value(&value));
    }
    let message: AnMessage = serde_json::from_value(value).map_err(ProviderError::malformed)?;
    if message.kind != "message" {
        return Err(ProviderError::malformed(format!(
            "unexpected type `{}`",
            message.kind
        )));
    }
    let mut content = Vec::new();
    let mut tool_calls = Vec::new();
    let mut thinking = Vec::new();
    for block in &message.content {
        match block.get("type").and_then(Value::as_str) {
            Some("thinking") => thinking.push(ThinkingBlock {
                text: str_at(block, "/thinking").to_owned(),
                signature: str_at(block, "/signature").to_owned(),
                redacted_data: String::new(),
            }),
            Some("redacted_thinking") => thinking.push(ThinkingBlock {
                redacted_data: str_at(block, "/data").to_owned(),
                ..Default::default()
            }),
            Some("text") => content.push(ContentPart {
                part: Some(Part::Text(
                    block
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                )),
            }),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: block
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                name: block
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                arguments_json: block.get("input").unwrap_or(&json!({})).to_string(),
                signature: String::new(),
            }),
            // Server tool blocks: nothing to carry them in.
            _ => {}
        }
    }
    Ok(ChatResponse {
        id: message.id,
        model: message.model,
        choices: vec![Choice {
            index: 0,
            message: Some(Message {
                role: Role::Assistant as i32,
                content,
                tool_calls,
                thinking,
                stop_sequence: stop_sequence_of(
                    message.stop_reason.as_deref(),
                    message.stop_sequence.as_deref(),
                ),
                ..Default::default()
            }),
            finish_reason: finish_reason(message.stop_reason.as_deref()) as i32,
        }],
        usage: message.usage.map(AnUsage::to_usage),
        created,
    })
}

/// Decodes a Messages stream: `message_start`, `content_block_start` / `_delta` / `_stop` (text
/// and `input_json_delta` tool arguments), `message_delta` (stop reason and usage: the chunk with
/// the finish reason carries the usage), `ping`, `error`, ended by `message_stop`.
#[derive(Debug)]
pub struct AnthropicDecoder {
    created: i64,
    id: String,
    model: String,
    usage: AnUsage,
    /// Tool-call index of each content block index that is a `tool_use`.
    tool_blocks: Vec<(u64, u32)>,
    next_tool: u32,
    /// Thinking-block index of each content block index that is a `thinking` block.
    thinking_blocks: Vec<(u64, u32)>,
    next_thinking: u32,
}

impl AnthropicDecoder {
    /// A decoder stamping chunks with `created`.
    pub fn new(created: i64) -> Self {
        AnthropicDecoder {
            created,
            id: String::new(),
            model: String::new(),
            usage: AnUsage::default(),
            tool_blocks: Vec::new(),
            next_tool: 0,
            thinking_blocks: Vec::new(),
            next_thinking: 0,
        }
    }

    fn chunk(&self, delta: ChoiceDelta, usage: Option<Usage>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            model: self.model.clone(),
            choices: vec![delta],
            usage,
            created: self.created,
        }
    }

    fn tool_index(&self, block: u64) -> Option<u32> {
        self.tool_blocks
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, t)| *t)
    }

    fn thinking_index(&self, block: u64) -> Result<u32, ProviderError> {
        self.thinking_blocks
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                ProviderError::malformed(format!("thinking delta for block {block}, not thinking"))
            })
    }

    fn thinking_chunk(&self, delta: ThinkingDelta) -> ChatChunk {
        self.chunk(
            ChoiceDelta {
                thinking: vec![delta],
                ..Default::default()
            },
            None,
        )
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

impl StreamDecoder for AnthropicDecoder {
    fn event(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let data: Value = serde_json::from_str(&event.data).map_err(ProviderError::malformed)?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event.event.as_str());
        let mut chunks = Vec::new();
        match kind {
            "message_start" => {
                let message = data.get("message").unwrap_or(&Value::Null);
                self.id = str_at(message, "/id").to_owned();
                self.model = str_at(message, "/model").to_owned();
                if let Some(usage) = message.get("usage") {
                    let usage: AnUsage =
                        serde_json::from_value(usage.clone()).map_err(ProviderError::malformed)?;
                    self.usage.update(&usage);
                }
                chunks.push(self.chunk(
                    ChoiceDelta {
                        role: Role::Assistant as i32,
                        ..Default::default()
                    },
                    None,
                ));
            }
            "content_block_start" => {
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                let block = data.get("content_block").unwrap_or(&Value::Null);
                match str_at(block, "/type") {
                    "text" => {
                        let text = str_at(block, "/text");
                        if !text.is_empty() {
                            chunks.push(self.chunk(
                                ChoiceDelta {
                                    content: text.to_owned(),
                                    ..Default::default()
                                },
                                None,
                            ));
                        }
                    }
                    "thinking" | "redacted_thinking" => {
                        let thinking = self.next_thinking;
                        self.next_thinking += 1;
                        self.thinking_blocks.push((index, thinking));
                        // Always sent, even empty: it opens the block for the gateway.
                        chunks.push(self.thinking_chunk(ThinkingDelta {
                            index: thinking,
                            text: str_at(block, "/thinking").to_owned(),
                            signature: str_at(block, "/signature").to_owned(),
                            redacted_data: str_at(block, "/data").to_owned(),
                        }));
                    }
                    "tool_use" => {
                        let tool = self.next_tool;
                        self.next_tool += 1;
                        self.tool_blocks.push((index, tool));
                        chunks.push(self.chunk(
                            ChoiceDelta {
                                tool_calls: vec![ToolCallDelta {
                                    index: tool,
                                    id: str_at(block, "/id").to_owned(),
                                    name: str_at(block, "/name").to_owned(),
                                    arguments_delta: String::new(),
                                    signature: String::new(),
                                }],
                                ..Default::default()
                            },
                            None,
                        ));
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                let delta = data.get("delta").unwrap_or(&Value::Null);
                match str_at(delta, "/type") {
                    "text_delta" => chunks.push(self.chunk(
                        ChoiceDelta {
                            content: str_at(delta, "/text").to_owned(),
                            ..Default::default()
                        },
                        None,
                    )),
                    "input_json_delta" => {
                        let tool = self.tool_index(index).ok_or_else(|| {
                            ProviderError::malformed(format!(
                                "input_json_delta for block {index}, not a tool_use"
                            ))
                        })?;
                        chunks.push(self.chunk(
                            ChoiceDelta {
                                tool_calls: vec![ToolCallDelta {
                                    index: tool,
                                    arguments_delta: str_at(delta, "/partial_json").to_owned(),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            },
                            None,
                        ));
                    }
                    "thinking_delta" => {
                        let thinking = self.thinking_index(index)?;
                        chunks.push(self.thinking_chunk(ThinkingDelta {
                            index: thinking,
                            text: str_at(delta, "/thinking").to_owned(),
                            ..Default::default()
                        }));
                    }
                    "signature_delta" => {
                        let thinking = self.thinking_index(index)?;
                        chunks.push(self.thinking_chunk(ThinkingDelta {
                            index: thinking,
                            signature: str_at(delta, "/signature").to_owned(),
                            ..Default::default()
                        }));
                    }
                    // citations_delta: nothing to carry it in.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(usage) = data.get("usage") {
                    let usage: AnUsage =
                        serde_json::from_value(usage.clone()).map_err(ProviderError::malformed)?;
                    self.usage.update(&usage);
                }
                let reason = data.pointer("/delta/stop_reason").and_then(Value::as_str);
                let sequence = data.pointer("/delta/stop_sequence").and_then(Value::as_str);
                chunks.push(self.chunk(
                    ChoiceDelta {
                        finish_reason: finish_reason(reason) as i32,
                        stop_sequence: stop_sequence_of(reason, sequence),
                        ..Default::default()
                    },
                    Some(self.usage.to_usage()),
                ));
            }
            "message_stop" => {
                return Ok(Decoded { chunks, done: true });
            }
            "error" => return Err(ProviderError::from_error_value(&data)),
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(Decoded {
            chunks,
            done: false,
        })
    }

    fn end_of_body(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        Err(ProviderError::Interrupted(
            "stream ended without message_stop".to_owned(),
        ))
    }

    /// `message_start`'s counts (input, cache reads and writes: final from the start), updated by
    /// `message_delta`'s.
    fn reported_usage(&self) -> Option<Usage> {
        let usage = self.usage;
        let reported = usage
            .input_tokens
            .or(usage.output_tokens)
            .or(usage.cache_creation_input_tokens)
            .or(usage.cache_read_input_tokens)
            .is_some();
        reported.then(|| usage.to_usage())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn block(text: &str, signature: &str, redacted_data: &str) -> ThinkingBlock {
        ThinkingBlock {
            text: text.into(),
            signature: signature.into(),
            redacted_data: redacted_data.into(),
        }
    }

    #[test]
    fn max_tokens_always_exceeds_the_thinking_budget() {
        use switchboard_proto::chat::v1::{SamplingParams, ThinkingConfig};
        let ask = |max_tokens: Option<u32>, enabled: bool, budget_tokens: u32, effort: &str| {
            let request = ChatRequest {
                model: "route".into(),
                messages: vec![Message::text(Role::User, "why")],
                sampling: Some(SamplingParams {
                    max_tokens,
                    ..Default::default()
                }),
                thinking: Some(ThinkingConfig {
                    enabled,
                    budget_tokens,
                    effort: effort.into(),
                }),
                ..Default::default()
            };
            // 4,096: the provider setting's default.
            let body = to_anthropic_request("claude", &request, false, 4096).unwrap();
            (
                body["max_tokens"].as_u64().unwrap(),
                body.get("thinking").cloned(),
            )
        };
        let enabled = |budget: u32| Some(json!({ "type": "enabled", "budget_tokens": budget }));
        // No client max_tokens: the budget plus the default, room for the visible answer.
        assert_eq!(ask(None, true, 0, "high"), (4096 + 4096, enabled(4096)));
        assert_eq!(ask(None, true, 0, "low"), (1024 + 4096, enabled(1024)));
        assert_eq!(
            ask(None, true, 10_000, ""),
            (10_000 + 4096, enabled(10_000))
        );
        // Enabled without a budget or effort: Anthropic's minimum, not 0.
        assert_eq!(ask(None, true, 0, ""), (1024 + 4096, enabled(1024)));
        // The client's max_tokens stays; the budget is clamped below it.
        assert_eq!(ask(Some(8192), true, 0, "high"), (8192, enabled(4096)));
        assert_eq!(ask(Some(4096), true, 0, "high"), (4096, enabled(4095)));
        assert_eq!(ask(Some(3000), true, 0, "high"), (3000, enabled(2999)));
        assert_eq!(ask(Some(1025), true, 0, "medium"), (1025, enabled(1024)));
        // Less than 1,024 left for thinking: no thinking block at all.
        assert_eq!(ask(Some(1024), true, 0, "low"), (1024, None));
        assert_eq!(ask(Some(500), true, 0, "high"), (500, None));
        // Thinking off: disabled, max_tokens as asked (or the default).
        let disabled = Some(json!({ "type": "disabled" }));
        assert_eq!(ask(None, false, 0, "none"), (4096, disabled.clone()));
        assert_eq!(ask(Some(100), false, 0, "none"), (100, disabled));
        // No thinking asked: none sent.
        let plain = ChatRequest {
            model: "route".into(),
            messages: vec![Message::text(Role::User, "why")],
            ..Default::default()
        };
        let body = to_anthropic_request("claude", &plain, false, 4096).unwrap();
        assert_eq!(body["max_tokens"], 4096);
        assert!(body.get("thinking").is_none());
    }

    fn weather_tool() -> switchboard_proto::chat::v1::Tool {
        switchboard_proto::chat::v1::Tool {
            name: "get_weather".into(),
            parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.into(),
            ..Default::default()
        }
    }

    /// User question, assistant call (with `thinking` blocks), tool result, and then `then`.
    fn tool_loop(thinking: Vec<ThinkingBlock>, then: Vec<Message>) -> ChatRequest {
        use switchboard_proto::chat::v1::ThinkingConfig;
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.content.clear();
        assistant.thinking = thinking;
        assistant.tool_calls = vec![ToolCall {
            id: "toolu_1".into(),
            name: "get_weather".into(),
            arguments_json: r#"{"city":"Paris"}"#.into(),
            signature: String::new(),
        }];
        let mut result = Message::text(Role::Tool, "18C");
        result.tool_call_id = "toolu_1".into();
        let mut messages = vec![
            Message::text(Role::User, "Weather in Paris?"),
            assistant,
            result,
        ];
        messages.extend(then);
        ChatRequest {
            model: "route".into(),
            messages,
            tools: vec![weather_tool()],
            thinking: Some(ThinkingConfig {
                enabled: true,
                effort: "high".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn thinking_is_left_out_of_a_tool_loop_whose_last_call_came_without_a_signed_block() {
        // The call came through the OpenAI face, or from another provider: no signed block.
        // Anthropic would answer 400 (the last assistant turn must start with thinking).
        for thinking in [vec![], vec![block("from Gemini", "", "")]] {
            let request = tool_loop(thinking, vec![]);
            let body = to_anthropic_request("claude", &request, false, 4096).unwrap();
            assert!(body.get("thinking").is_none(), "{body}");
            // The answer keeps the room it has without thinking.
            assert_eq!(body["max_tokens"], 4096);
            assert_eq!(body["messages"][1]["content"][0]["type"], "tool_use");
        }
        // The same with the results followed by more user text, merged into their turn.
        let request = tool_loop(vec![], vec![Message::text(Role::User, "Also Oslo?")]);
        let body = to_anthropic_request("claude", &request, false, 4096).unwrap();
        assert!(body.get("thinking").is_none(), "{body}");
        // Signed (or redacted) thinking first in the turn: thinking stays on.
        for signed in [block("hmm", "EqQB", ""), block("", "", "EmwK")] {
            let request = tool_loop(vec![signed], vec![]);
            let body = to_anthropic_request("claude", &request, false, 4096).unwrap();
            assert_eq!(
                body["thinking"],
                json!({ "type": "enabled", "budget_tokens": 4096 })
            );
            assert_eq!(body["max_tokens"], 8192);
        }
        // A loop that is over (a new user question after the assistant's answer): thinking on.
        let request = tool_loop(
            vec![],
            vec![
                Message::text(Role::Assistant, "18C in Paris."),
                Message::text(Role::User, "And tomorrow?"),
            ],
        );
        let body = to_anthropic_request("claude", &request, false, 4096).unwrap();
        assert_eq!(body["thinking"]["type"], "enabled");
    }

    #[test]
    fn effort_derived_thinking_is_left_out_when_the_tool_choice_forces_a_tool() {
        use switchboard_proto::chat::v1::{ThinkingConfig, ToolChoice};
        let ask = |choice: ToolChoiceKind, budget_tokens: u32, effort: &str| ChatRequest {
            model: "route".into(),
            messages: vec![Message::text(Role::User, "Weather in Paris?")],
            tools: vec![weather_tool()],
            tool_choice: Some(ToolChoice {
                choice: Some(choice),
            }),
            thinking: Some(ThinkingConfig {
                enabled: true,
                budget_tokens,
                effort: effort.into(),
            }),
            ..Default::default()
        };
        let required = ToolChoiceKind::Mode(ToolChoiceMode::Required as i32);
        let named = ToolChoiceKind::FunctionName("get_weather".into());
        let auto = ToolChoiceKind::Mode(ToolChoiceMode::Auto as i32);
        for (choice, expected) in [
            (required.clone(), json!({ "type": "any" })),
            (
                named.clone(),
                json!({ "type": "tool", "name": "get_weather" }),
            ),
        ] {
            let body =
                to_anthropic_request("claude", &ask(choice, 0, "medium"), false, 4096).unwrap();
            assert!(body.get("thinking").is_none(), "{body}");
            assert_eq!(body["tool_choice"], expected);
            assert_eq!(body["max_tokens"], 4096);
        }
        // `auto` lets the model think.
        let body = to_anthropic_request("claude", &ask(auto, 0, "medium"), false, 4096).unwrap();
        assert_eq!(
            body["thinking"],
            json!({ "type": "enabled", "budget_tokens": 2048 })
        );
        // A budget the client set itself (Anthropic's own terms) is sent as asked.
        let body = to_anthropic_request("claude", &ask(required, 2000, ""), false, 4096).unwrap();
        assert_eq!(body["thinking"]["budget_tokens"], 2000);
    }

    #[test]
    fn with_both_temperature_and_top_p_only_temperature_is_sent() {
        use switchboard_proto::chat::v1::SamplingParams;
        let ask = |temperature: Option<f64>, top_p: Option<f64>| {
            let request = ChatRequest {
                model: "route".into(),
                messages: vec![Message::text(Role::User, "hi")],
                sampling: Some(SamplingParams {
                    temperature,
                    top_p,
                    ..Default::default()
                }),
                ..Default::default()
            };
            to_anthropic_request("claude", &request, false, 1024).unwrap()
        };
        let both = ask(Some(0.2), Some(1.0));
        assert_eq!(both["temperature"], 0.2);
        assert!(both.get("top_p").is_none(), "{both}");
        let top_p = ask(None, Some(0.9));
        assert_eq!(top_p["top_p"], 0.9);
        assert!(top_p.get("temperature").is_none());
        let temperature = ask(Some(0.7), None);
        assert_eq!(temperature["temperature"], 0.7);
        assert!(temperature.get("top_p").is_none());
    }

    #[test]
    fn only_signed_and_redacted_thinking_blocks_are_sent_back() {
        let mut assistant = Message::text(Role::Assistant, "Checking.");
        assistant.thinking = vec![
            // Gemini thought summary / reasoning_content: no signature, not sent.
            block("**Weighing** the options.", "", ""),
            block("The user wants the weather.", "EqQBCgIYAhIM", ""),
            block("", "", "EmwKAhgBEgy3"),
            // A signed block with empty text (omitted thinking) still goes.
            block("", "EqQBsig2", ""),
            block("", "", ""),
        ];
        assistant.tool_calls = vec![ToolCall {
            id: "toolu_1".into(),
            name: "weather".into(),
            arguments_json: "{}".into(),
            signature: "Z2VtaW5p".into(),
        }];
        // An assistant turn whose only block is unsigned thinking has nothing left to send.
        let mut unsigned_only = Message::text(Role::Assistant, "");
        unsigned_only.content.clear();
        unsigned_only.thinking = vec![block("from another provider", "", "")];
        let mut result = Message::text(Role::Tool, "sunny");
        result.tool_call_id = "toolu_1".into();
        let request = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Weather?"),
                assistant,
                result,
                unsigned_only,
                Message::text(Role::User, "Thanks"),
            ],
            ..Default::default()
        };
        let body = to_anthropic_request("claude", &request, false, 1024).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                { "role": "user", "content": [{ "type": "text", "text": "Weather?" }] },
                { "role": "assistant", "content": [
                    { "type": "thinking", "thinking": "The user wants the weather.",
                      "signature": "EqQBCgIYAhIM" },
                    { "type": "redacted_thinking", "data": "EmwKAhgBEgy3" },
                    { "type": "thinking", "thinking": "", "signature": "EqQBsig2" },
                    { "type": "text", "text": "Checking." },
                    // A call's (Gemini) signature is not Anthropic's: not sent.
                    { "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {} },
                ] },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny" },
                    { "type": "text", "text": "Thanks" },
                ] },
            ])
        );
        let text = body.to_string();
        assert!(
            !text.contains("Weighing") && !text.contains("another provider"),
            "{text}"
        );
    }

    #[test]
    fn an_assistant_refusal_of_the_history_is_sent_as_text() {
        let mut refusal = Message::text(Role::Assistant, "");
        refusal.content.clear();
        refusal.refusal = "I can't help with that.".into();
        let request = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Plan the heist."),
                refusal,
                Message::text(Role::User, "Please?"),
            ],
            ..Default::default()
        };
        let body = to_anthropic_request("claude", &request, false, 1024).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                { "role": "user", "content": [{ "type": "text", "text": "Plan the heist." }] },
                { "role": "assistant", "content": [{ "type": "text", "text": "I can't help with that." }] },
                { "role": "user", "content": [{ "type": "text", "text": "Please?" }] },
            ])
        );
    }
}
