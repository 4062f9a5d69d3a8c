//! Translation between `switchboard.chat.v1` and the Google Gemini `generateContent` /
//! `streamGenerateContent?alt=sse` wire format.
//!
//! Requests: system and developer messages become `systemInstruction`; assistant turns are role
//! `model` (tool calls as `functionCall` parts, an OpenAI `refusal` as a text part after the
//! content); tool results are `functionResponse` parts of a
//! user turn, named after the call they answer (found by `tool_call_id` among the earlier
//! assistant tool calls, else the message's `name`), with the result as `response` (a JSON object
//! result as is, other text as `{"content": text}`). A replayed `functionCall` part carries its
//! call's `ToolCall.signature` as `thoughtSignature`, the one Gemini sent with the call, or, when
//! the call has none (it came from another provider, or Gemini signed only the first of parallel
//! calls), Gemini's documented placeholder `skip_thought_signature_validator`. Images:
//! `data:` URLs as `inlineData`, other URLs as `fileData`. JSON mode is `responseMimeType:
//! application/json` (+ `responseJsonSchema`); `top_k` is `generationConfig.topK`. `user`,
//! `parallel_tool_calls` and `Tool.strict` have no Gemini equivalent and are not sent; neither are
//! an assistant message's `thinking` blocks (Gemini takes no thought text back, and Anthropic's
//! are signed for Anthropic only), nor a tool message's `tool_error` flag (the result content goes
//! as is). `ChatRequest.thinking` enabled is `generationConfig.thinkingConfig` with
//! `includeThoughts: true` and `thinkingBudget` (when a budget is given, or an OpenAI-style effort:
//! low 1,024, medium 2,048, high 4,096); disabled is not sent (some
//! Gemini models cannot stop thinking, so the model's default applies).
//!
//! Responses: parts with `"thought": true` are thought summaries (Gemini sends them when
//! `thinkingConfig.includeThoughts` is set): each run of consecutive thought parts of a candidate
//! is one unsigned `Message.thinking` block, never content; in streams their text comes as
//! `ChoiceDelta.thinking` pieces, of block 0 unless answer text or a call came between two runs
//! (the next run is the next block, as in the unary answer). A `thoughtSignature` on a
//! `functionCall` part is kept in that call's `ToolCall.signature` (streams: on its
//! `ToolCallDelta`, which carries the whole call); signatures on other parts have no field and are
//! dropped. A call without `id` (Gemini sends none) gets `call_<tag>_<index>`, the tag a hash of
//! the request's conversation so that ids never repeat across turns; a tool result is matched to
//! the most recent earlier call with its id. A part of the
//! wrong shape (a `text` that is not a string, ...) is a malformed answer. A prompt blocked by
//! `promptFeedback.blockReason` is [`ProviderError::ContentFiltered`]; a candidate stopped for
//! SAFETY (or another policy reason) finishes with `FINISH_REASON_CONTENT_FILTER`.
//! Usage: `prompt_tokens = promptTokenCount + toolUsePromptTokenCount` (cached content included),
//! `completion_tokens = candidatesTokenCount + thoughtsTokenCount`, `cached_prompt_tokens =
//! cachedContentTokenCount`, `reasoning_tokens = thoughtsTokenCount`.

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

/// How tool parameter schemas are sent (see [`ToolSchemas::for_version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSchemas {
    /// Whole, as JSON Schema, in `functionDeclarations[].parametersJsonSchema` (v1beta).
    JsonSchema,
    /// Converted to Gemini's OpenAPI 3.0 subset, in `functionDeclarations[].parameters`.
    OpenApi,
}

impl ToolSchemas {
    /// `parametersJsonSchema` for v1beta (the default) and any other version but `v1`: the field
    /// takes full JSON Schema (`additionalProperties`, `const`, type arrays, `$schema`, ...), which
    /// `parameters` rejects with a 400. The stable `v1` is not documented to have it: schemas go
    /// there converted to the OpenAPI subset (see [`openapi_schema`]).
    pub fn for_version(api_version: Option<&str>) -> Self {
        if api_version.is_some_and(|v| v.eq_ignore_ascii_case("v1")) {
            ToolSchemas::OpenApi
        } else {
            ToolSchemas::JsonSchema
        }
    }
}

/// Keywords of Gemini's `Schema` (a select subset of OpenAPI 3.0) that are kept as they are.
const OPENAPI_KEYWORDS: [&str; 18] = [
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "propertyOrdering",
    "default",
    "minimum",
    "maximum",
];

/// A JSON Schema as Gemini's OpenAPI-subset `Schema`: keywords it does not know (`$schema`,
/// `additionalProperties`, `$ref`/`$defs`, `not`, ...) are dropped, a type array becomes one type
/// plus `nullable` (several types: `anyOf`), `const` an `enum` of one, `oneOf` `anyOf`;
/// `properties`, `items` and `anyOf` are converted in turn.
pub fn openapi_schema(schema: &Value) -> Value {
    let Value::Object(schema) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in schema {
        match key.as_str() {
            "type" => match value {
                Value::Array(types) => {
                    let mut named: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                    if named.len() < types.len() {
                        out.insert("nullable".into(), json!(true));
                    }
                    if named.len() == 1 {
                        out.insert("type".into(), named.remove(0).clone());
                    } else if named.len() > 1 {
                        let any: Vec<Value> = named.iter().map(|t| json!({ "type": t })).collect();
                        out.insert("anyOf".into(), Value::Array(any));
                    }
                }
                other => {
                    out.insert("type".into(), other.clone());
                }
            },
            "const" => {
                out.insert("enum".into(), json!([value]));
            }
            "properties" => {
                if let Value::Object(properties) = value {
                    let converted: Map<String, Value> = properties
                        .iter()
                        .map(|(name, property)| (name.clone(), openapi_schema(property)))
                        .collect();
                    out.insert("properties".into(), Value::Object(converted));
                }
            }
            "items" => {
                out.insert("items".into(), openapi_schema(value));
            }
            "anyOf" | "oneOf" => {
                if let Value::Array(options) = value {
                    let converted: Vec<Value> = options.iter().map(openapi_schema).collect();
                    out.insert("anyOf".into(), Value::Array(converted));
                }
            }
            known if OPENAPI_KEYWORDS.contains(&known) => {
                out.insert(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    // `enum` with `null` among its values is how JSON Schema says nullable; OpenAPI wants strings.
    if let Some(Value::Array(values)) = out.get_mut("enum")
        && values.iter().any(Value::is_null)
    {
        values.retain(|v| !v.is_null());
        out.insert("nullable".into(), json!(true));
    }
    Value::Object(out)
}

/// The `generateContent` body for `request` (the model is in the URL), tool parameter schemas
/// sent as `schemas` says. `tags` are never sent.
pub fn to_gemini_request(
    request: &ChatRequest,
    schemas: ToolSchemas,
) -> Result<Value, TranslateError> {
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
                // A refusal (OpenAI's) is what the model said: it goes as text, not lost.
                if !message.refusal.is_empty() {
                    parts.push(json!({ "text": message.refusal }));
                }
                for (j, call) in message.tool_calls.iter().enumerate() {
                    let signature = if call.signature.is_empty() {
                        PLACEHOLDER_SIGNATURE
                    } else {
                        call.signature.as_str()
                    };
                    parts.push(json!({
                        "functionCall": { "name": call.name,
                            "args": tool_arguments(&call.arguments_json, &format!("{field}.tool_calls[{j}].arguments_json"))? },
                        "thoughtSignature": signature,
                    }));
                }
                ("model", parts)
            }
            Ok(Role::Tool) => {
                // The most recent call with that id: ids invented by other gateways (or by
                // Gemini adapters that number calls per answer) may repeat across turns.
                let name = request.messages[..i]
                    .iter()
                    .rev()
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
                let schema = parse_json_text(
                    &tool.parameters_json,
                    &format!("tools[{i}].parameters_json"),
                )?;
                match schemas {
                    ToolSchemas::JsonSchema => {
                        out.insert("parametersJsonSchema".into(), schema);
                    }
                    ToolSchemas::OpenApi => {
                        out.insert("parameters".into(), openapi_schema(&schema));
                    }
                }
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
    // Thinking on: Gemini returns thought summaries (`includeThoughts`) within the budget (none
    // given: Gemini's dynamic budget). Off: not sent (some Gemini models cannot stop thinking; the
    // model's default applies).
    if let Some(thinking) = request.thinking.as_ref().filter(|t| t.enabled) {
        let mut thinking_config = Map::new();
        thinking_config.insert("includeThoughts".into(), json!(true));
        let budget = super::thinking_budget(thinking);
        if budget > 0 {
            thinking_config.insert("thinkingBudget".into(), json!(budget));
        }
        config.insert("thinkingConfig".into(), Value::Object(thinking_config));
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
struct GmFunctionCall {
    id: Option<String>,
    name: Option<String>,
    args: Option<Value>,
}

/// One part of a candidate's content; kinds we do not carry (`inlineData`, `executableCode`, ...)
/// are ignored.
#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GmPart {
    text: Option<String>,
    /// A thought summary (its `text`), not answer text.
    thought: Option<bool>,
    thought_signature: Option<String>,
    function_call: Option<GmFunctionCall>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GmContent {
    parts: Vec<GmPart>,
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
    /// Present (even `null`): the body is an error object.
    #[serde(deserialize_with = "present")]
    error: Option<Value>,
}

/// `Some` for any value the field holds, `null` included (a missing field is `None`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
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

/// One response (or stream event), parsed once into its type; only a body that is an error object,
/// or that fails the typed parse, is looked at again as generic JSON.
fn parse(data: &[u8]) -> Result<GmResponse, ProviderError> {
    checked(data, serde_json::from_slice(data))
}

/// [`parse`] of a stream event, text already known to be UTF-8: `from_str` skips the check
/// `from_slice` makes on every key and string.
fn parse_text(data: &str) -> Result<GmResponse, ProviderError> {
    checked(data.as_bytes(), serde_json::from_str(data))
}

/// `parsed` (the typed parse of `data`), or the error `data` holds.
fn checked(
    data: &[u8],
    parsed: serde_json::Result<GmResponse>,
) -> Result<GmResponse, ProviderError> {
    let response: GmResponse = match parsed {
        Ok(response) => response,
        Err(error) => {
            return Err(match serde_json::from_slice::<Value>(data) {
                Ok(value) if value.get("error").is_some() => {
                    ProviderError::from_error_value(&value)
                }
                _ => ProviderError::malformed(error),
            });
        }
    };
    if response.error.is_some() {
        let value: Value = serde_json::from_slice(data).map_err(ProviderError::malformed)?;
        return Err(ProviderError::from_error_value(&value));
    }
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

/// The tag of the ids invented for the calls of answers to `request` (`call_<tag>_<n>`): a
/// 64-bit FNV-1a hash of its conversation, in hex. Numbering alone (`call_0`) repeats in every
/// answer, and a later tool result would then be matched to an earlier turn's call of another
/// function; a conversation only grows from turn to turn, so each turn gets its own tag. The tag
/// is deterministic, so the same request unary and streamed (or replayed from the cache) shows the
/// same ids.
pub(crate) fn call_tag(request: &ChatRequest) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    // Each field length-prefixed, so that moving text between fields changes the hash.
    let mut field = |bytes: &[u8]| {
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(PRIME);
        }
    };
    for message in &request.messages {
        field(&message.role.to_le_bytes());
        for part in &message.content {
            match &part.part {
                Some(Part::Text(text)) => field(text.as_bytes()),
                Some(Part::ImageUrl(image)) => field(image.url.as_bytes()),
                None => field(b""),
            }
        }
        for call in &message.tool_calls {
            field(call.id.as_bytes());
            field(call.name.as_bytes());
            field(call.arguments_json.as_bytes());
        }
        field(message.tool_call_id.as_bytes());
        field(message.name.as_bytes());
    }
    format!("{hash:016x}")
}

/// The id of the `n`th call without one (see [`call_tag`]; no tag: `call_<n>`).
fn invented_id(tag: &str, n: u32) -> String {
    if tag.is_empty() {
        format!("call_{n}")
    } else {
        format!("call_{tag}_{n}")
    }
}

/// Where one candidate's numbering stands; a stream carries it from one event to the next.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// Index of the next call without an id (`call_<tag>_<n>`), and of the next call delta.
    next_call: u32,
    /// The thinking block a following thought part continues; none at the start and after answer
    /// text or a call.
    open_thought: Option<u32>,
    /// Index of the next thinking block.
    next_thought: u32,
}

/// What one candidate's parts carry.
#[derive(Debug, Default)]
struct Pieces {
    /// Answer text, joined.
    text: String,
    /// Thought-summary text by thinking block index, in order (one entry per block).
    thoughts: Vec<(u32, String)>,
    /// Function calls, with their signatures.
    calls: Vec<ToolCall>,
}

/// Splits one candidate's parts into answer text, thought summaries and function calls, numbering
/// from `cursor` (and advancing it); a call without an id gets `call_<tag>_<n>`.
fn split_parts(parts: &[GmPart], cursor: &mut Cursor, tag: &str) -> Pieces {
    let mut pieces = Pieces::default();
    for part in parts {
        let text = part.text.as_deref().unwrap_or_default();
        if part.thought == Some(true) {
            // An empty thought part (a bare signature) neither opens nor closes a block.
            if text.is_empty() {
                continue;
            }
            let block = match cursor.open_thought {
                Some(block) => block,
                None => {
                    let block = cursor.next_thought;
                    cursor.next_thought += 1;
                    cursor.open_thought = Some(block);
                    block
                }
            };
            match pieces.thoughts.last_mut() {
                Some((index, joined)) if *index == block => joined.push_str(text),
                _ => pieces.thoughts.push((block, text.to_owned())),
            }
            continue;
        }
        if !text.is_empty() {
            cursor.open_thought = None;
            pieces.text.push_str(text);
        }
        if let Some(call) = &part.function_call {
            cursor.open_thought = None;
            let id = call
                .id
                .clone()
                .unwrap_or_else(|| invented_id(tag, cursor.next_call));
            cursor.next_call += 1;
            pieces.calls.push(ToolCall {
                id,
                name: call.name.clone().unwrap_or_default(),
                arguments_json: call.args.as_ref().unwrap_or(&json!({})).to_string(),
                signature: part.thought_signature.clone().unwrap_or_default(),
            });
        }
    }
    pieces
}

/// Parses a `generateContent` response; `created` is stamped (Gemini sends none), `call_tag` goes
/// in the ids of calls without one (see [`call_tag`]).
pub fn parse_response(
    body: &[u8],
    created: i64,
    call_tag: &str,
) -> Result<ChatResponse, ProviderError> {
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
            let Pieces {
                text,
                thoughts,
                calls: tool_calls,
            } = split_parts(parts, &mut Cursor::default(), call_tag);
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
                    thinking: thoughts
                        .into_iter()
                        .map(|(_, text)| ThinkingBlock {
                            text,
                            ..Default::default()
                        })
                        .collect(),
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
    /// The tag of invented call ids (see [`call_tag`]).
    call_tag: String,
    /// Candidate indexes that got their first (role) delta, and where their numbering stands.
    candidates: Vec<(u32, Cursor)>,
}

impl GeminiDecoder {
    /// A decoder stamping chunks with `created`, and `call_tag` in the ids of calls without one.
    pub fn new(created: i64, call_tag: &str) -> Self {
        GeminiDecoder {
            created,
            id: String::new(),
            model: String::new(),
            usage: None,
            finished: false,
            call_tag: call_tag.to_owned(),
            candidates: Vec::new(),
        }
    }
}

impl StreamDecoder for GeminiDecoder {
    fn event(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let response = parse_text(&event.data)?;
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
            let (first, mut cursor) = match self.candidates.iter().find(|(i, _)| *i == index) {
                Some((_, cursor)) => (false, *cursor),
                None => (true, Cursor::default()),
            };
            let start = cursor.next_call;
            let parts = candidate
                .content
                .as_ref()
                .map(|c| c.parts.as_slice())
                .unwrap_or_default();
            let Pieces {
                text,
                thoughts,
                calls,
            } = split_parts(parts, &mut cursor, &self.call_tag);
            match self.candidates.iter_mut().find(|(i, _)| *i == index) {
                Some(entry) => entry.1 = cursor,
                None => self.candidates.push((index, cursor)),
            }
            let finish = match &candidate.finish_reason {
                Some(reason) => {
                    self.finished = true;
                    finish_reason(Some(reason), cursor.next_call > 0)
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
                        signature: call.signature,
                    })
                    .collect(),
                finish_reason: finish as i32,
                thinking: thoughts
                    .into_iter()
                    .map(|(index, text)| ThinkingDelta {
                        index,
                        text,
                        ..Default::default()
                    })
                    .collect(),
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

    /// The latest `usageMetadata` (every event carries one: the prompt's counts, the output's
    /// so far).
    fn reported_usage(&self) -> Option<Usage> {
        self.usage.map(GmUsage::to_usage)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A `get_weather` call for `city` with Gemini's `signature` (empty: none).
    fn weather_call(id: &str, city: &str, signature: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "get_weather".into(),
            arguments_json: format!(r#"{{"city":"{city}"}}"#),
            signature: signature.into(),
        }
    }

    fn block(text: &str) -> ThinkingBlock {
        ThinkingBlock {
            text: text.into(),
            ..Default::default()
        }
    }

    fn answer(parts: Value) -> Value {
        json!({ "candidates": [{ "content": { "role": "model", "parts": parts },
            "finishReason": "STOP", "index": 0 }], "responseId": "r", "modelVersion": "gemini-2.5-flash" })
    }

    fn message_of(body: &Value) -> Message {
        let response = parse_response(body.to_string().as_bytes(), 1, "t").unwrap();
        response.choices[0].message.clone().unwrap()
    }

    #[test]
    fn error_objects_map_to_the_taxonomy_whatever_else_the_body_holds() {
        let quota = r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
        assert!(matches!(
            parse_response(quota.as_bytes(), 1, "t"),
            Err(ProviderError::RateLimited { status: 429, .. })
        ));
        // With fields that do not fit a response's shape, and with a `null` error (still an error).
        let odd = r#"{"candidates":"none","error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#;
        assert!(matches!(
            parse_response(odd.as_bytes(), 1, "t"),
            Err(ProviderError::Overloaded { status: 503, .. })
        ));
        assert!(parse_response(br#"{"error":null}"#, 1, "t").is_err());
        assert!(matches!(
            parse_response(br#"{"candidates":"none"}"#, 1, "t"),
            Err(ProviderError::Protocol(_))
        ));
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        let mut decoder = GeminiDecoder::new(1, "t");
        assert!(matches!(
            decoder.event(&event(quota)),
            Err(ProviderError::RateLimited { status: 429, .. })
        ));
        let text = answer(json!([{ "text": "hi" }])).to_string();
        let decoded = decoder.event(&event(&text)).unwrap();
        assert_eq!(decoded.chunks[0].choices[0].content, "hi");
    }

    #[test]
    fn thought_parts_become_thinking_blocks_and_call_signatures_are_kept() {
        let message = message_of(&answer(json!([
            { "text": "**Weighing** the cities.", "thought": true },
            { "text": " Paris first.", "thought": true },
            { "text": "", "thought": true, "thoughtSignature": "c2lnLXRob3VnaHQ=" },
            { "text": "Checking." },
            { "text": "Now the calls.", "thought": true },
            { "functionCall": { "name": "get_weather", "args": { "city": "Paris" } },
              "thoughtSignature": "c2lnLTE=" },
            { "functionCall": { "id": "fc-2", "name": "get_weather", "args": { "city": "Oslo" } } },
        ])));
        // Runs of thought parts are blocks (an empty thought part neither opens nor closes one);
        // thought text never reaches the content, and no block is signed.
        assert_eq!(
            message.thinking,
            vec![
                block("**Weighing** the cities. Paris first."),
                block("Now the calls.")
            ]
        );
        assert_eq!(message.joined_text(), "Checking.");
        assert_eq!(
            message.tool_calls,
            vec![
                weather_call("call_t_0", "Paris", "c2lnLTE="),
                weather_call("fc-2", "Oslo", ""),
            ]
        );
        // No thought parts: no blocks; a thought flag set to false is answer text.
        let message = message_of(&answer(json!([
            { "text": "a", "thought": false }, { "text": "b", "thoughtSignature": "c2ln" }
        ])));
        assert!(message.thinking.is_empty());
        assert_eq!(message.joined_text(), "ab");
    }

    #[test]
    fn parts_of_the_wrong_shape_are_malformed() {
        for parts in [
            json!([{ "text": 5 }]),
            json!([{ "text": "x", "thought": "yes" }]),
            json!([{ "functionCall": { "name": "f" }, "thoughtSignature": 7 }]),
            json!([{ "functionCall": { "name": ["f"] } }]),
        ] {
            let error =
                parse_response(answer(parts.clone()).to_string().as_bytes(), 1, "t").unwrap_err();
            assert_eq!(error.code(), "PROTOCOL_ERROR", "{parts}");
            let mut decoder = GeminiDecoder::new(1, "t");
            let event = SseEvent {
                event: String::new(),
                data: answer(parts.clone()).to_string(),
            };
            assert_eq!(
                decoder.event(&event).unwrap_err().code(),
                "PROTOCOL_ERROR",
                "{parts}"
            );
        }
    }

    fn decode(events: &[Value]) -> Vec<ChoiceDelta> {
        let mut decoder = GeminiDecoder::new(1, "t");
        let mut deltas = Vec::new();
        for data in events {
            let event = SseEvent {
                event: String::new(),
                data: data.to_string(),
            };
            for chunk in decoder.event(&event).unwrap().chunks {
                deltas.extend(chunk.choices);
            }
        }
        deltas
    }

    fn piece(index: u32, text: &str) -> Vec<ThinkingDelta> {
        vec![ThinkingDelta {
            index,
            text: text.into(),
            ..Default::default()
        }]
    }

    #[test]
    fn streamed_thoughts_are_thinking_pieces_and_calls_carry_their_signature() {
        let event = |parts: Value, finish: Option<&str>| {
            let mut candidate =
                json!({ "content": { "role": "model", "parts": parts }, "index": 0 });
            if let Some(finish) = finish {
                candidate["finishReason"] = json!(finish);
            }
            json!({ "candidates": [candidate], "responseId": "r" })
        };
        let deltas = decode(&[
            event(json!([{ "text": "Thinking", "thought": true }]), None),
            event(json!([{ "text": " more.", "thought": true }]), None),
            event(json!([{ "text": "Let me check." }]), None),
            event(json!([{ "text": "Which tool?", "thought": true }]), None),
            event(
                json!([
                    { "functionCall": { "name": "get_weather", "args": { "city": "Paris" } },
                      "thoughtSignature": "c2lnLTE=" },
                    { "functionCall": { "name": "get_time", "args": {} } },
                ]),
                Some("STOP"),
            ),
        ]);
        assert_eq!(deltas.len(), 5);
        // One run of thought pieces is block 0, never content; the run after answer text is block 1.
        assert_eq!(deltas[0].role, Role::Assistant as i32);
        assert_eq!(deltas[0].thinking, piece(0, "Thinking"));
        assert_eq!(deltas[0].content, "");
        assert_eq!(deltas[1].thinking, piece(0, " more."));
        assert_eq!(deltas[1].content, "");
        assert!(deltas[2].thinking.is_empty());
        assert_eq!(deltas[2].content, "Let me check.");
        assert_eq!(deltas[3].thinking, piece(1, "Which tool?"));
        assert_eq!(deltas[3].content, "");
        // A call arrives whole, its signature on its only delta.
        assert_eq!(
            deltas[4].tool_calls,
            vec![
                ToolCallDelta {
                    index: 0,
                    id: "call_t_0".into(),
                    name: "get_weather".into(),
                    arguments_delta: r#"{"city":"Paris"}"#.into(),
                    signature: "c2lnLTE=".into(),
                },
                ToolCallDelta {
                    index: 1,
                    id: "call_t_1".into(),
                    name: "get_time".into(),
                    arguments_delta: "{}".into(),
                    signature: String::new(),
                },
            ]
        );
        assert_eq!(deltas[4].finish_reason, FinishReason::ToolCalls as i32);
    }

    #[test]
    fn invented_call_ids_differ_from_one_turn_to_the_next() {
        // Turn 1 asks; Gemini calls get_weather (no id). Turn 2 sends the call and its result
        // back; Gemini calls get_time (no id). The two calls must not share an id.
        let call = |name: &str| json!([{ "functionCall": { "name": name, "args": {} } }]);
        let mut turn_1 = ChatRequest {
            messages: vec![Message::text(Role::User, "Weather, then time?")],
            ..Default::default()
        };
        let first = parse_response(
            answer(call("get_weather")).to_string().as_bytes(),
            1,
            &call_tag(&turn_1),
        )
        .unwrap();
        let first = first.choices[0].message.clone().unwrap();
        let first_id = first.tool_calls[0].id.clone();
        let mut result = Message::text(Role::Tool, "sunny");
        result.tool_call_id = first_id.clone();
        let mut turn_2 = turn_1.clone();
        turn_2.messages.extend([first, result]);
        let second = parse_response(
            answer(call("get_time")).to_string().as_bytes(),
            1,
            &call_tag(&turn_2),
        )
        .unwrap();
        let second_id = second.choices[0].message.as_ref().unwrap().tool_calls[0]
            .id
            .clone();
        assert_ne!(first_id, second_id);
        for id in [&first_id, &second_id] {
            assert!(id.starts_with("call_") && id.ends_with("_0"), "{id}");
            assert!(
                id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{id}"
            );
        }
        // The same request (unary, streamed, or again) gets the same ids.
        let tag = call_tag(&turn_2);
        let mut decoder = GeminiDecoder::new(1, &tag);
        let event = SseEvent {
            event: String::new(),
            data: answer(call("get_time")).to_string(),
        };
        let chunks = decoder.event(&event).unwrap().chunks;
        assert_eq!(chunks[0].choices[0].tool_calls[0].id, second_id);
        // Any change to the conversation changes the tag.
        turn_1.messages[0] = Message::text(Role::User, "Weather, then time!");
        assert_ne!(call_tag(&turn_1), call_tag(&turn_2));
        assert_ne!(
            call_tag(&turn_1),
            call_tag(&ChatRequest {
                messages: vec![Message::text(Role::User, "Weather, then time?")],
                ..Default::default()
            })
        );
    }

    #[test]
    fn a_tool_result_answers_the_most_recent_call_with_its_id() {
        // Two turns whose calls got the same id (as `call_0` per answer used to be): the second
        // result answers get_time, not the earlier get_weather.
        let turn = |name: &str| {
            let mut assistant = Message::text(Role::Assistant, "");
            assistant.tool_calls = vec![ToolCall {
                id: "call_0".into(),
                name: name.into(),
                arguments_json: "{}".into(),
                signature: String::new(),
            }];
            let mut result = Message::text(Role::Tool, r#"{"ok":true}"#);
            result.tool_call_id = "call_0".into();
            [assistant, result]
        };
        let mut messages = vec![Message::text(Role::User, "Weather, then time?")];
        messages.extend(turn("get_weather"));
        messages.extend(turn("get_time"));
        let body = to_gemini_request(
            &ChatRequest {
                messages,
                ..Default::default()
            },
            ToolSchemas::JsonSchema,
        )
        .unwrap();
        let responses: Vec<&Value> = body["contents"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["parts"].as_array().unwrap())
            .filter_map(|p| p.get("functionResponse"))
            .collect();
        assert_eq!(responses.len(), 2);
        assert_eq!(responses[0]["name"], "get_weather");
        assert_eq!(responses[1]["name"], "get_time");
    }

    #[test]
    fn replayed_calls_carry_their_own_signature_else_the_placeholder() {
        let mut assistant = Message::text(Role::Assistant, "Checking.");
        // Thinking blocks (Gemini thoughts read earlier, or Anthropic's signed ones) are not sent.
        assistant.thinking = vec![
            block("Weighing the cities."),
            ThinkingBlock {
                text: "signed".into(),
                signature: "YW50aHJvcGlj".into(),
                redacted_data: String::new(),
            },
        ];
        assistant.tool_calls = vec![
            weather_call("call_0", "Paris", "c2lnLTE="),
            weather_call("call_1", "Oslo", ""),
        ];
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "Weather?"), assistant],
            ..Default::default()
        };
        let body = to_gemini_request(&request, ToolSchemas::JsonSchema).unwrap();
        assert_eq!(
            body["contents"][1],
            json!({ "role": "model", "parts": [
                { "text": "Checking." },
                { "functionCall": { "name": "get_weather", "args": { "city": "Paris" } },
                  "thoughtSignature": "c2lnLTE=" },
                { "functionCall": { "name": "get_weather", "args": { "city": "Oslo" } },
                  "thoughtSignature": PLACEHOLDER_SIGNATURE },
            ] })
        );
        let text = body.to_string();
        assert!(
            !text.contains("Weighing") && !text.contains("YW50aHJvcGlj"),
            "{text}"
        );
    }

    #[test]
    fn thinking_on_asks_gemini_for_thought_summaries_within_the_budget() {
        use switchboard_proto::chat::v1::ThinkingConfig;
        let ask = |thinking: Option<ThinkingConfig>| {
            to_gemini_request(
                &ChatRequest {
                    messages: vec![Message::text(Role::User, "why")],
                    thinking,
                    ..Default::default()
                },
                ToolSchemas::JsonSchema,
            )
            .unwrap()
        };
        let on = ask(Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 2048,
            ..Default::default()
        }));
        assert_eq!(
            on["generationConfig"]["thinkingConfig"],
            json!({ "includeThoughts": true, "thinkingBudget": 2048 })
        );
        let dynamic = ask(Some(ThinkingConfig {
            enabled: true,
            budget_tokens: 0,
            ..Default::default()
        }));
        assert_eq!(
            dynamic["generationConfig"]["thinkingConfig"],
            json!({ "includeThoughts": true })
        );
        for off in [
            None,
            Some(ThinkingConfig {
                enabled: false,
                budget_tokens: 0,
                ..Default::default()
            }),
        ] {
            assert!(ask(off).get("generationConfig").is_none());
        }
    }

    #[test]
    fn an_assistant_refusal_of_the_history_is_sent_as_text() {
        let mut refusal = Message::text(Role::Assistant, "");
        refusal.content.clear();
        refusal.refusal = "I can't help with that.".into();
        let body = to_gemini_request(
            &ChatRequest {
                messages: vec![
                    Message::text(Role::User, "Plan the heist."),
                    refusal,
                    Message::text(Role::User, "Please?"),
                ],
                ..Default::default()
            },
            ToolSchemas::JsonSchema,
        )
        .unwrap();
        assert_eq!(
            body["contents"],
            json!([
                { "role": "user", "parts": [{ "text": "Plan the heist." }] },
                { "role": "model", "parts": [{ "text": "I can't help with that." }] },
                { "role": "user", "parts": [{ "text": "Please?" }] },
            ])
        );
    }

    #[test]
    fn tool_schemas_go_whole_as_json_schema_except_to_v1_which_gets_the_openapi_subset() {
        use switchboard_proto::chat::v1::Tool;
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "city": { "type": "string", "description": "the city" },
                "unit": { "type": ["string", "null"], "enum": ["c", "f", null] },
                "mode": { "const": "fast" },
                "tags": { "type": "array", "items": { "type": "string", "minLength": 1 } },
                "either": { "oneOf": [{ "type": "integer" }, { "type": "object",
                    "properties": {}, "additionalProperties": false }] },
                "many": { "type": ["integer", "string"] },
            },
            "required": ["city", "unit"],
            "additionalProperties": false,
            "$defs": { "x": { "type": "string" } },
        });
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "weather?")],
            tools: vec![Tool {
                name: "get_weather".into(),
                parameters_json: schema.to_string(),
                strict: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        for version in [None, Some("v1beta"), Some("v1alpha")] {
            assert_eq!(ToolSchemas::for_version(version), ToolSchemas::JsonSchema);
        }
        let body = to_gemini_request(&request, ToolSchemas::JsonSchema).unwrap();
        let declaration = &body["tools"][0]["functionDeclarations"][0];
        assert_eq!(declaration["parametersJsonSchema"], schema);
        assert!(declaration.get("parameters").is_none(), "{declaration}");

        assert_eq!(ToolSchemas::for_version(Some("v1")), ToolSchemas::OpenApi);
        let body = to_gemini_request(&request, ToolSchemas::OpenApi).unwrap();
        let declaration = &body["tools"][0]["functionDeclarations"][0];
        assert!(declaration.get("parametersJsonSchema").is_none());
        assert_eq!(
            declaration["parameters"],
            json!({
                "type": "object",
                "properties": {
                    "city": { "type": "string", "description": "the city" },
                    "unit": { "type": "string", "nullable": true, "enum": ["c", "f"] },
                    "mode": { "enum": ["fast"] },
                    "tags": { "type": "array", "items": { "type": "string", "minLength": 1 } },
                    "either": { "anyOf": [{ "type": "integer" },
                        { "type": "object", "properties": {} }] },
                    "many": { "anyOf": [{ "type": "integer" }, { "type": "string" }] },
                },
                "required": ["city", "unit"],
            })
        );
    }
}
