//! Restores pseudonymised values (`<EMAIL_ADDRESS_1>` → the original) in answers before they reach
//! the caller. The mapping comes from the guard's `CheckPrompt` and lives for one request only: it
//! is never logged, put in a span, a usage event or the cache (which holds the placeholder version).
//! Reasoning blocks keep their placeholders: a signed block must reach the caller as the provider
//! signed it (it is echoed back in the next turn, where that turn's own pseudonyms apply).

use std::collections::BTreeMap;

use switchboard_proto::chat::v1::{
    ChatChunk, ChatResponse, ChoiceDelta, FinishReason, ToolCallDelta, content_part::Part,
};
use switchboard_pseudonym::{Mapping, Restorer, restore};

/// One request's pseudonyms: the values as they are for text, and JSON-escaped for tool-call
/// arguments (a placeholder there sits inside a JSON string).
#[derive(Debug, Clone, Default)]
pub struct Pseudonyms {
    text: Mapping,
    json: Mapping,
}

impl Pseudonyms {
    /// The pseudonyms of the guard's answer.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let text: Mapping = pairs.into_iter().collect();
        let json = text
            .pairs()
            .into_iter()
            .map(|(placeholder, value)| (placeholder.to_owned(), json_escaped(value)))
            .collect();
        Pseudonyms { text, json }
    }

    /// Whether there is nothing to restore.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Restores every text part and tool-call argument of every choice of `response`.
    pub fn restore_response(&self, response: &mut ChatResponse) {
        if self.is_empty() {
            return;
        }
        for message in response
            .choices
            .iter_mut()
            .filter_map(|choice| choice.message.as_mut())
        {
            for part in &mut message.content {
                if let Some(Part::Text(text)) = &mut part.part {
                    *text = restore(text, &self.text);
                }
            }
            if !message.refusal.is_empty() {
                message.refusal = restore(&message.refusal, &self.text);
            }
            for call in &mut message.tool_calls {
                call.arguments_json = restore(&call.arguments_json, &self.json);
            }
        }
    }

    /// A restorer of one stream, or `None` when there is nothing to restore.
    pub fn stream(&self) -> Option<StreamRestorer> {
        (!self.is_empty()).then(|| StreamRestorer {
            pseudonyms: self.clone(),
            content: BTreeMap::new(),
            refusal: BTreeMap::new(),
            arguments: BTreeMap::new(),
        })
    }
}

/// `value` as it appears inside a JSON string (without the quotes).
fn json_escaped(value: &str) -> String {
    let quoted = serde_json::Value::String(value.to_owned()).to_string();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .map(str::to_owned)
        .unwrap_or(quoted)
}

/// Restores a stream chunk by chunk: a placeholder split across chunks is held back until it is
/// complete, per choice (content) and per tool call (arguments).
#[derive(Debug)]
pub struct StreamRestorer {
    pseudonyms: Pseudonyms,
    content: BTreeMap<u32, Restorer>,
    refusal: BTreeMap<u32, Restorer>,
    arguments: BTreeMap<(u32, u32), Restorer>,
}

impl StreamRestorer {
    /// Restores `chunk` in place. When a choice finishes in this chunk, what was held back for it
    /// is released into this chunk (before its finish reason).
    pub fn chunk(&mut self, chunk: &mut ChatChunk) {
        for choice in &mut chunk.choices {
            let index = choice.index;
            let content = self
                .content
                .entry(index)
                .or_insert_with(|| Restorer::new(self.pseudonyms.text.clone()));
            choice.content = content.push(&choice.content);
            if !choice.refusal.is_empty() || self.refusal.contains_key(&index) {
                let refusal = self
                    .refusal
                    .entry(index)
                    .or_insert_with(|| Restorer::new(self.pseudonyms.text.clone()));
                choice.refusal = refusal.push(&choice.refusal);
            }
            for call in &mut choice.tool_calls {
                let arguments = self
                    .arguments
                    .entry((index, call.index))
                    .or_insert_with(|| Restorer::new(self.pseudonyms.json.clone()));
                call.arguments_delta = arguments.push(&call.arguments_delta);
            }
            if choice.finish_reason != FinishReason::Unspecified as i32 {
                self.release(choice);
            }
        }
    }

    /// What is still held back (a stream that ended without finish reasons), as one chunk.
    pub fn finish(&mut self, id: &str) -> Option<ChatChunk> {
        let indexes: Vec<u32> = self
            .content
            .keys()
            .copied()
            .chain(self.refusal.keys().copied())
            .chain(self.arguments.keys().map(|(choice, _)| *choice))
            .collect();
        let mut choices: Vec<ChoiceDelta> = Vec::new();
        for index in indexes {
            if choices.iter().any(|c| c.index == index) {
                continue;
            }
            let mut choice = ChoiceDelta {
                index,
                ..Default::default()
            };
            self.release(&mut choice);
            if !choice.content.is_empty()
                || !choice.refusal.is_empty()
                || !choice.tool_calls.is_empty()
            {
                choices.push(choice);
            }
        }
        (!choices.is_empty()).then(|| ChatChunk {
            id: id.to_owned(),
            choices,
            ..Default::default()
        })
    }

    /// Appends what is held back for `choice` and forgets its restorers.
    fn release(&mut self, choice: &mut ChoiceDelta) {
        let index = choice.index;
        if let Some(mut content) = self.content.remove(&index) {
            choice.content.push_str(&content.finish());
        }
        if let Some(mut refusal) = self.refusal.remove(&index) {
            choice.refusal.push_str(&refusal.finish());
        }
        let calls: Vec<(u32, u32)> = self
            .arguments
            .range((index, 0)..=(index, u32::MAX))
            .map(|(key, _)| *key)
            .collect();
        for key in calls {
            let Some(mut arguments) = self.arguments.remove(&key) else {
                continue;
            };
            let rest = arguments.finish();
            if rest.is_empty() {
                continue;
            }
            match choice
                .tool_calls
                .iter_mut()
                .find(|call| call.index == key.1)
            {
                Some(call) => call.arguments_delta.push_str(&rest),
                None => choice.tool_calls.push(ToolCallDelta {
                    index: key.1,
                    arguments_delta: rest,
                    ..Default::default()
                }),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use switchboard_proto::chat::v1::{Choice, Message, Role, ToolCall};

    fn pseudonyms() -> Pseudonyms {
        Pseudonyms::new([
            (
                "<EMAIL_ADDRESS_1>".to_owned(),
                "jane@example.com".to_owned(),
            ),
            ("<NAME_1>".to_owned(), "Jane \"JJ\" Doe".to_owned()),
        ])
    }

    fn delta(index: u32, content: &str, finish: FinishReason) -> ChatChunk {
        ChatChunk {
            choices: vec![ChoiceDelta {
                index,
                content: content.to_owned(),
                finish_reason: finish as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_response_is_restored_in_text_and_tool_arguments() {
        let mut message = Message::text(Role::Assistant, "mail <EMAIL_ADDRESS_1> and <NAME_1>");
        message.tool_calls = vec![ToolCall {
            id: "c".into(),
            name: "send".into(),
            arguments_json: r#"{"to":"<EMAIL_ADDRESS_1>","name":"<NAME_1>"}"#.into(),
            signature: String::new(),
        }];
        let mut response = ChatResponse {
            choices: vec![Choice {
                message: Some(message),
                ..Default::default()
            }],
            ..Default::default()
        };
        pseudonyms().restore_response(&mut response);
        let message = response.choices[0].message.as_ref().unwrap();
        assert_eq!(
            message.joined_text(),
            "mail jane@example.com and Jane \"JJ\" Doe"
        );
        let arguments: serde_json::Value =
            serde_json::from_str(&message.tool_calls[0].arguments_json).unwrap();
        assert_eq!(arguments["to"], "jane@example.com");
        assert_eq!(arguments["name"], "Jane \"JJ\" Doe");
    }

    #[test]
    fn a_refusal_is_restored_unary_and_streamed() {
        let message = Message {
            refusal: "I will not write to <EMAIL_ADDRESS_1>.".into(),
            ..Default::default()
        };
        let mut response = ChatResponse {
            choices: vec![Choice {
                message: Some(message),
                ..Default::default()
            }],
            ..Default::default()
        };
        pseudonyms().restore_response(&mut response);
        assert_eq!(
            response.choices[0].message.as_ref().unwrap().refusal,
            "I will not write to jane@example.com."
        );
        // Streamed: a placeholder split across refusal pieces, the last held until the finish
        // or the end of the stream.
        let refusal = |text: &str, finish: FinishReason| ChatChunk {
            choices: vec![ChoiceDelta {
                refusal: text.to_owned(),
                finish_reason: finish as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        for finish in [FinishReason::Stop, FinishReason::Unspecified] {
            let mut restorer = pseudonyms().stream().unwrap();
            let mut out = String::new();
            for mut chunk in [
                refusal("I will not write to <EMAIL_", FinishReason::Unspecified),
                refusal("ADDRESS_1> or <NAME", FinishReason::Unspecified),
                refusal("_1", finish),
            ] {
                restorer.chunk(&mut chunk);
                out.push_str(&chunk.choices[0].refusal);
            }
            if let Some(rest) = restorer.finish("id") {
                out.push_str(&rest.choices[0].refusal);
            }
            assert_eq!(
                out, "I will not write to jane@example.com or <NAME_1",
                "{finish:?}"
            );
        }
    }

    #[test]
    fn a_placeholder_split_across_chunks_is_restored_per_choice() {
        let mut restorer = pseudonyms().stream().unwrap();
        let mut out: BTreeMap<u32, String> = BTreeMap::new();
        let mut chunks = vec![
            delta(0, "echo: mail <EMAIL_A", FinishReason::Unspecified),
            delta(1, "other <EMAIL_ADDRESS", FinishReason::Unspecified),
            delta(0, "DDRESS_1> now <NAM", FinishReason::Unspecified),
            delta(1, "_1>", FinishReason::Unspecified),
            delta(0, "E_1", FinishReason::Stop),
        ];
        for chunk in &mut chunks {
            restorer.chunk(chunk);
            for choice in &chunk.choices {
                out.entry(choice.index)
                    .or_default()
                    .push_str(&choice.content);
            }
        }
        // Choice 0 finished: its held-back tail ("<NAME_1" never closed) came out with the finish.
        assert_eq!(out[&0], "echo: mail jane@example.com now <NAME_1");
        assert_eq!(out[&1], "other jane@example.com");
        assert!(restorer.finish("id").is_none());
    }

    #[test]
    fn what_is_held_back_comes_out_at_the_end_of_an_unfinished_stream() {
        let mut restorer = pseudonyms().stream().unwrap();
        let mut chunk = delta(0, "x <EMAIL", FinishReason::Unspecified);
        restorer.chunk(&mut chunk);
        assert_eq!(chunk.choices[0].content, "x ");
        let rest = restorer.finish("id").unwrap();
        assert_eq!(rest.id, "id");
        assert_eq!(rest.choices[0].content, "<EMAIL");
    }

    #[test]
    fn streamed_tool_arguments_are_restored_json_escaped() {
        let mut restorer = pseudonyms().stream().unwrap();
        let mut arguments = String::new();
        for (piece, finish) in [
            (r#"{"name":"<NA"#, FinishReason::Unspecified),
            (r#"ME_1>"}"#, FinishReason::ToolCalls),
        ] {
            let mut chunk = ChatChunk {
                choices: vec![ChoiceDelta {
                    index: 0,
                    tool_calls: vec![ToolCallDelta {
                        index: 0,
                        arguments_delta: piece.into(),
                        ..Default::default()
                    }],
                    finish_reason: finish as i32,
                    ..Default::default()
                }],
                ..Default::default()
            };
            restorer.chunk(&mut chunk);
            for call in &chunk.choices[0].tool_calls {
                arguments.push_str(&call.arguments_delta);
            }
        }
        let arguments: serde_json::Value = serde_json::from_str(&arguments).unwrap();
        assert_eq!(arguments["name"], "Jane \"JJ\" Doe");
    }

    #[test]
    fn no_pseudonyms_no_restorer() {
        assert!(Pseudonyms::default().stream().is_none());
        assert!(!format!("{:?}", pseudonyms()).contains("jane"));
    }
}
