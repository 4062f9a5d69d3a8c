//! Translation between `switchboard.chat.v1` and the Google Gemini `generateContent` /
//! `streamGenerateContent?alt=sse` wire format.
//!
//! Requests: system and developer messages become `systemInstruction`; assistant turns are role
//! `model` (tool calls as `functionCall` parts); tool results are `functionResponse` parts of a
//! user turn, named after the call they answer (found by `tool_call_id` among the earlier
//! assistant tool calls, else the message's `name`), with the result as `response` (a JSON object
//! result as is, other text as `{"content": text}`). Replayed `functionCall` parts carry Gemini's
//! documented placeholder `thoughtSignature` (we have no field to keep the real one). Images:
//! `data:` URLs as `inlineData`, other URLs as `fileData`. JSON mode is `responseMimeType:
//! application/json` (+ `responseJsonSchema`); `top_k` is `generationConfig.topK`. `user`,
//! `parallel_tool_calls` and `Tool.strict` have no Gemini equivalent and are not sent; neither are
//! an assistant message's `thinking` blocks (Anthropic's, signed for Anthropic only), nor
//! `ChatRequest.thinking` (Anthropic's switch; Gemini's `thinkingConfig` differs), nor a tool
//! message's `tool_error` flag (the result content goes as is).
//!
//! Responses: Gemini has no tool-call ids; a call without `id` gets `call_<index>`. A prompt
//! blocked by `promptFeedback.blockReason` is [`ProviderError::ContentFiltered`]; a candidate
//! stopped for SAFETY (or another policy reason) finishes with `FINISH_REASON_CONTENT_FILTER`.
//! Usage: `prompt_tokens = promptTokenCount + toolUsePromptTokenCount` (cached content included),
//! `completion_tokens = candidatesTokenCount + thoughtsTokenCount`, `cached_prompt_tokens =
//! cachedContentTokenCount`, `reasoning_tokens = thoughtsTokenCount`.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_proto::chat::v1::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, ContentPart, FinishReason, Message,
    ResponseFormatType, Role, ToolCall, ToolCallDelta, ToolChoiceMode, Usage, content_part::Part,
    tool_choice::Choice as ToolChoiceKind,
};

use super::{
    Decoded, ProviderError, StreamDecoder,
    openai::{TranslateError, content_values, invalid, parse_json_text, tool_arguments},
    sse::SseEvent,
};

/// Gemini's documented placeholder for function-call history whose signature is unknown.
const PLACEHOLDER_SIGNATURE: &str = "skip_thought_signature_validator";

fn mime_of(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let extension = path
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match extension.as_str() {
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => "image/jpeg",
    }
}

fn image_part(url: &str, field: &str) -> Result<Value, TranslateError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| invalid(field, "a data: URL needs a `,`"))?;
        let mime = meta
            .strip_suffix(";base64")
            .ok_or_else(|| invalid(field, "only base64 data: URLs are supported"))?;
        return Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }));
    }
    Ok(json!({ "fileData": { "mimeType": mime_of(url), "fileUri": url } }))
}

fn parts_of(message: &Message, field: &str) -> Result<Vec<Value>, TranslateError> {
    content_values(message, field, |text| json!({ "text": text }), image_part)
}

/// The `generateContent` body for `request` (the model is in the URL). `tags` are never sent.
pub fn to_gemini_request(request: &ChatRequest) -> Result<Value, TranslateError> {
    let mut body = Map::new();
    let system: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| matches!(Role::try_from(m.role), Ok(Role::System | Role::Developer)))
        .flat_map(|m| m.content.iter())
        .filter_map(|p| match &p.part {
            Some(Part::Text(text)) if !text.is_empty() => Some(json!({ "text": text })),
            _ => None,
        })
        .collect();
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }

    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in request.messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let (role, parts) = match Role::try_from(message.role) {
            Ok(Role::System | Role::Developer) => continue,
            Ok(Role::User) => ("user", parts_of(message, &field)?),
            Ok(Role::Assistant) => {
                let mut parts = parts_of(message, &field)?;
                for (j, call) in message.tool_calls.iter().enumerate() {
                    parts.push(json!({
                        "functionCall": { "name": call.name,
                            "args": tool_arguments(&call.arguments_json, &format!("{field}.tool_calls[{j}].arguments_json"))? },
                        "thoughtSignature": PLACEHOLDER_SIGNATURE,
                    }));
                }
                ("model", parts)
            }
            Ok(Role::Tool) => {
                let name = request.messages[..i]
                    .iter()
                    .flat_map(|m| m.tool_calls.iter())
                    .find(|call| !message.tool_call_id.is_empty() && call.id == message.tool_call_id)
                    .map(|call| call.name.clone())
                    .or_else(|| (!message.name.is_empty()).then(|| message.name.clone()))
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}.tool_call_id"),
                            "names no tool call of an earlier assistant message (Gemini needs the function name)",
                        )
                    })?;
                let text = message
                    .content
                    .iter()
                    .filter_map(|p| match &p.part {
                        Some(Part::Text(text)) => Some(text.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(object @ Value::Object(_)) => object,
                    _ => json!({ "content": text }),
                };
                (
                    "user",
                    vec![json!({ "functionResponse": { "name": name, "response": response } })],
                )
            }
            Ok(Role::Unspecified) | Err(_) => {
                return Err(invalid(format!("{field}.role"), "role must be set"));
            }
        };
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => contents.push((role, parts)),
        }
    }
    body.insert(
        "contents".into(),
        contents
            .into_iter()
            .map(|(role, parts)| json!({ "role": role, "parts": parts }))
            .collect(),
    );

    if !request.tools.is_empty() {
        let mut declarations = Vec::with_capacity(request.tools.len());
        for (i, tool) in request.tools.iter().enumerate() {
            let mut out = Map::new();
            out.insert("name".into(), json!(tool.name));
            if !tool.description.is_empty() {
                out.insert("description".into(), json!(tool.description));
            }
            if !tool.parameters_json.trim().is_empty() {
                out.insert(
                    "parameters".into(),
                    parse_json_text(
                        &tool.parameters_json,
                        &format!("tools[{i}].parameters_json"),
                    )?,
                );
            }
            declarations.push(Value::Object(out));
        }
        body.insert(
            "tools".into(),
            json!([{ "functionDeclarations": declarations }]),
        );
    }
    let calling = request
        .tool_choice
        .as_ref()
        .and_then(|c| c.choice.as_ref())
        .and_then(|choice| match choice {
            ToolChoiceKind::Mode(mode) => match ToolChoiceMode::try_from(*mode) {
                Ok(ToolChoiceMode::None) => Some(json!({ "mode": "NONE" })),
                Ok(ToolChoiceMode::Auto) => Some(json!({ "mode": "AUTO" })),
                Ok(ToolChoiceMode::Required) => Some(json!({ "mode": "ANY" })),
                Ok(ToolChoiceMode::Unspecified) | Err(_) => None,
            },
            ToolChoiceKind::FunctionName(name) => {
                Some(json!({ "mode": "ANY", "allowedFunctionNames": [name] }))
            }
        });
    if let Some(calling) = calling {
        body.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": calling }),
        );
    }

    let mut config = Map::new();
    if let Some(sampling) = &request.sampling {
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                config.insert(key.into(), value);
            }
        };
        put("temperature", sampling.temperature.map(|v| json!(v)));
        put("topP", sampling.top_p.map(|v| json!(v)));
        put("topK", sampling.top_k.map(|v| json!(v)));
        put("maxOutputTokens", sampling.max_tokens.map(|v| json!(v)));
        put(
            "stopSequences",
            (!sampling.stop.is_empty()).then(|| json!(sampling.stop)),
        );
        put(
            "presencePenalty",
            sampling.presence_penalty.map(|v| json!(v)),
        );
        put(
            "frequencyPenalty",
            sampling.frequency_penalty.map(|v| json!(v)),
        );
        put("seed", sampling.seed.map(|v| json!(v)));
        put("candidateCount", sampling.n.map(|v| json!(v)));
    }
    if let Some(format) = &request.response_format {
        match ResponseFormatType::try_from(format.r#type) {
            Ok(ResponseFormatType::Text) => {
                config.insert("responseMimeType".into(), json!("text/plain"));
            }
            Ok(ResponseFormatType::JsonObject) => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Ok(ResponseFormatType::JsonSchema) => {
                config.insert("responseMimeType".into(), json!("application/json"));
                if !format.json_schema_json.trim().is_empty() {
                    config.insert(
                        "responseJsonSchema".into(),
                        parse_json_text(
                            &format.json_schema_json,
                            "response_format.json_schema_json",
                        )?,
                    );
                }
            }
            Ok(ResponseFormatType::Unspecified) | Err(_) => {}
        }
    }
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(body))
}

// === responses ===

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(default, rename_all = "camelCase")]
struct GmUsage {
    prompt_token_count: u32,
    candidates_token_count: u32,
    cached_content_token_count: u32,
    thoughts_token_count: u32,
    tool_use_prompt_token_count: u32,
}

impl GmUsage {
    fn to_usage(self) -> Usage {
        let prompt = self.prompt_token_count + self.tool_use_prompt_token_count;
        let completion = self.candidates_token_count + self.thoughts_token_count;
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_prompt_tokens: self.cached_content_token_count,
            reasoning_tokens: self.thoughts_token_count,
            cache_write_tokens: 0,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GmContent {
    parts: Vec<Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GmCandidate {
    content: Option<GmContent>,
    finish_reason: Option<String>,
    index: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GmResponse {
    candidates: Vec<GmCandidate>,
    prompt_feedback: Option<Value>,
    usage_metadata: Option<GmUsage>,
    model_version: String,
    response_id: String,
    error: Option<Value>,
}

/// Maps a Gemini finish reason (`calls` says whether the candidate called functions).
pub fn finish_reason(reason: Option<&str>, calls: bool) -> FinishReason {
    match reason {
        Some("STOP") if calls => FinishReason::ToolCalls,
        Some("STOP") => FinishReason::Stop,
        Some("MAX_TOKENS") => FinishReason::Length,
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT"
            | "IMAGE_RECITATION",
        ) => FinishReason::ContentFilter,
        Some("MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "OTHER" | "LANGUAGE") => {
            FinishReason::Error
        }
        _ => FinishReason::Unspecified,
    }
}

fn parse(data: &[u8]) -> Result<GmResponse, ProviderError> {
    let value: Value = serde_json::from_slice(data).map_err(ProviderError::malformed)?;
    if value.get("error").is_some() {
        return Err(ProviderError::from_error_value(&value));
    }
    let response: GmResponse = serde_json::from_value(value).map_err(ProviderError::malformed)?;
    if let Some(reason) = response
        .prompt_feedback
        .as_ref()
        .and_then(|f| f.get("blockReason"))
        .and_then(Value::as_str)
    {
        return Err(ProviderError::ContentFiltered {
            status: 200,
            message: format!("prompt blocked by the provider (blockReason {reason})"),
        });
    }
    Ok(response)
}

/// Text and function calls of one candidate's parts (thought summaries are skipped).
/// `next_call` numbers the calls without an id.
fn split_parts(parts: &[Value], next_call: &mut u32) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for part in parts {
        if part.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(piece) = part.get("text").and_then(Value::as_str) {
            text.push_str(piece);
        }
        if let Some(call) = part.get("functionCall") {
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("call_{next_call}"));
            *next_call += 1;
            calls.push(ToolCall {
                id,
                name: call
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                arguments_json: call.get("args").unwrap_or(&json!({})).to_string(),
            });
        }
    }
    (text, calls)
}

/// Parses a `generateContent` response; `created` is stamped (Gemini sends none).
pub fn parse_response(body: &[u8], created: i64) -> Result<ChatResponse, ProviderError> {
    let response = parse(body)?;
    if response.candidates.is_empty() {
        return Err(ProviderError::malformed("no candidates"));
    }
    let choices = response
        .candidates
        .iter()
        .enumerate()
        .map(|(position, candidate)| {
            let parts = candidate
                .content
                .as_ref()
                .map(|c| c.parts.as_slice())
                .unwrap_or_default();
            let mut next_call = 0;
            let (text, tool_calls) = split_parts(parts, &mut next_call);
            let finish = finish_reason(candidate.finish_reason.as_deref(), !tool_calls.is_empty());
            Choice {
                index: candidate.index.unwrap_or(position as u32),
                message: Some(Message {
                    role: Role::Assistant as i32,
                    content: if text.is_empty() {
                        Vec::new()
                    } else {
                        vec![ContentPart {
                            part: Some(Part::Text(text)),
                        }]
                    },
                    tool_calls,
                    ..Default::default()
                }),
                finish_reason: finish as i32,
            }
        })
        .collect();
    Ok(ChatResponse {
        id: response.response_id,
        model: response.model_version,
        choices,
        usage: response.usage_metadata.map(GmUsage::to_usage),
        created,
    })
}

/// Decodes `streamGenerateContent?alt=sse`: each event is a whole `GenerateContentResponse`
/// with the next piece of each candidate (a `functionCall` arrives whole). The stream ends at the
/// end of the body, which is proper only after a candidate finished; the usage (last
/// `usageMetadata`) then comes as a final chunk without choices.
#[derive(Debug)]
pub struct GeminiDecoder {
    created: i64,
    id: String,
    model: String,
    usage: Option<GmUsage>,
    finished: bool,
    /// Candidate indexes that got their first (role) delta, and their next tool-call index.
    candidates: Vec<(u32, u32)>,
}

impl GeminiDecoder {
    /// A decoder stamping chunks with `created`.
    pub fn new(created: i64) -> Self {
        GeminiDecoder {
            created,
            id: String::new(),
            model: String::new(),
            usage: None,
            finished: false,
            candidates: Vec::new(),
        }
    }
}

impl StreamDecoder for GeminiDecoder {
    fn event(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let response = parse(event.data.as_bytes())?;
        if self.id.is_empty() {
            self.id = response.response_id.clone();
        }
        if self.model.is_empty() {
            self.model = response.model_version.clone();
        }
        if let Some(usage) = response.usage_metadata {
            self.usage = Some(usage);
        }
        let mut deltas = Vec::new();
        for (position, candidate) in response.candidates.iter().enumerate() {
            let index = candidate.index.unwrap_or(position as u32);
            let (first, mut next_call) = match self.candidates.iter().find(|(i, _)| *i == index) {
                Some((_, next)) => (false, *next),
                None => (true, 0),
            };
            let start = next_call;
            let parts = candidate
                .content
                .as_ref()
                .map(|c| c.parts.as_slice())
                .unwrap_or_default();
            let (text, calls) = split_parts(parts, &mut next_call);
            match self.candidates.iter_mut().find(|(i, _)| *i == index) {
                Some(entry) => entry.1 = next_call,
                None => self.candidates.push((index, next_call)),
            }
            let finish = match &candidate.finish_reason {
                Some(reason) => {
                    self.finished = true;
                    finish_reason(Some(reason), next_call > 0)
                }
                None => FinishReason::Unspecified,
            };
            deltas.push(ChoiceDelta {
                index,
                role: if first {
                    Role::Assistant as i32
                } else {
                    Role::Unspecified as i32
                },
                content: text,
                tool_calls: calls
                    .into_iter()
                    .zip(start..)
                    .map(|(call, index)| ToolCallDelta {
                        index,
                        id: call.id,
                        name: call.name,
                        arguments_delta: call.arguments_json,
                    })
                    .collect(),
                finish_reason: finish as i32,
                ..Default::default()
            });
        }
        let chunks = if deltas.is_empty() {
            Vec::new()
        } else {
            vec![ChatChunk {
                id: self.id.clone(),
                model: self.model.clone(),
                choices: deltas,
                usage: None,
                created: self.created,
            }]
        };
        Ok(Decoded {
            chunks,
            done: false,
        })
    }

    fn end_of_body(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        if !self.finished {
            return Err(ProviderError::Interrupted(
                "stream ended before a candidate finished".to_owned(),
            ));
        }
        Ok(self
            .usage
            .map(|usage| ChatChunk {
                id: self.id.clone(),
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(usage.to_usage()),
                created: self.created,
            })
            .into_iter()
            .collect())
    }
}
