//! The provider-neutral view of a request and the deterministic answer every format renders.

use serde_json::Value;

/// Why the fake's answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ContentFilter,
    /// The model declined: the content is its refusal text (OpenAI `refusal`, Anthropic
    /// `stop_reason: "refusal"`).
    Refusal,
}

/// What the fake says when a prompt asks it to refuse.
pub(crate) const REFUSAL: &str = "I'm sorry, I can't help with that.";

/// One tool call the fake makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub name: String,
    pub arguments: String,
}

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    Text { content: String, finish: Finish },
    ToolCalls(Vec<Call>),
}

/// A request, whatever its wire format.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Prompt {
    /// The model (body field, deployment or path segment).
    pub model: String,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage` (the other formats always report usage).
    pub include_usage: bool,
    /// Whitespace-separated words of every text in the request (system, messages, tool results).
    pub prompt_words: u64,
    /// Text of the last user-authored message that is not only tool results.
    pub last_user: String,
    /// Names of the declared tools, in order.
    pub tools: Vec<String>,
    pub max_tokens: Option<u64>,
    /// Anthropic extended thinking was enabled: the answer starts with a signed thinking block.
    /// Gemini `thinkingConfig` was sent: the answer's first function call is signed.
    pub thinking: bool,
    /// Anthropic `stop_sequences`: a text answer ends before the first one it contains.
    pub stop_sequences: Vec<String>,
}

pub(crate) fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Arguments of a tool call asked for by `text`: the first `{` to the last `}` if that is JSON,
/// else `{}`.
fn arguments_in(text: &str) -> String {
    if let (Some(start), Some(end)) = (text.find('{'), text.rfind('}'))
        && start < end
    {
        let candidate = &text[start..=end];
        if serde_json::from_str::<Value>(candidate).is_ok_and(|v| v.is_object()) {
            return candidate.to_owned();
        }
    }
    "{}".to_owned()
}

/// The deterministic answer and its usage `(prompt, completion)`.
///
/// - With tools declared and a last user text containing `call tool`: a call of the first tool
///   (`call every tool`: one call per tool), with the JSON object written in the text as arguments
///   (`{}` when there is none).
/// - A last user text containing `please refuse`: the refusal [`REFUSAL`] (finish `Refusal`).
/// - Otherwise `"echo: " + last user text`, cut to `max_tokens` words (finish `length`).
pub(crate) fn answer(prompt: &Prompt) -> (Answer, u64, u64) {
    if prompt.last_user.contains("please refuse") {
        let content = REFUSAL.to_owned();
        let completion = word_count(&content);
        let finish = Finish::Refusal;
        return (
            Answer::Text { content, finish },
            prompt.prompt_words,
            completion,
        );
    }
    let every = prompt.last_user.contains("call every tool");
    if !prompt.tools.is_empty() && (every || prompt.last_user.contains("call tool")) {
        let arguments = arguments_in(&prompt.last_user);
        let names: Vec<&String> = if every {
            prompt.tools.iter().collect()
        } else {
            prompt.tools.iter().take(1).collect()
        };
        let calls: Vec<Call> = names
            .into_iter()
            .map(|name| Call {
                name: name.clone(),
                arguments: arguments.clone(),
            })
            .collect();
        let completion = calls
            .iter()
            .map(|c| word_count(&c.name) + word_count(&c.arguments))
            .sum();
        return (Answer::ToolCalls(calls), prompt.prompt_words, completion);
    }
    let mut content = format!("echo: {}", prompt.last_user);
    let mut finish = Finish::Stop;
    let words: Vec<&str> = content.split_whitespace().collect();
    if let Some(limit) = prompt.max_tokens
        && (limit as usize) < words.len()
    {
        content = words[..limit as usize].join(" ");
        finish = Finish::Length;
    }
    let completion = word_count(&content);
    (
        Answer::Text { content, finish },
        prompt.prompt_words,
        completion,
    )
}

/// The answer cut by a content filter: the first word only.
pub(crate) fn filtered(answer: Answer) -> Answer {
    match answer {
        Answer::Text { content, .. } => Answer::Text {
            content: content
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            finish: Finish::ContentFilter,
        },
        Answer::ToolCalls(_) => Answer::Text {
            content: String::new(),
            finish: Finish::ContentFilter,
        },
    }
}

/// Splits `text` into at most `pieces` parts of roughly equal length (on char boundaries).
pub(crate) fn split_pieces(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let pieces = pieces.max(1);
    let size = chars.len().div_ceil(pieces);
    chars
        .chunks(size)
        .map(|chunk| chunk.iter().collect())
        .collect()
}
