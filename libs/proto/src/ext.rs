use crate::chat::v1::{ContentPart, Message, Role, content_part::Part};

impl Message {
    /// A message with one text part.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role: role as i32,
            content: vec![ContentPart {
                part: Some(Part::Text(text.into())),
            }],
            ..Default::default()
        }
    }

    /// The concatenated text parts of the message.
    pub fn joined_text(&self) -> String {
        let mut out = String::new();
        for part in &self.content {
            if let Some(Part::Text(text)) = &part.part {
                out.push_str(text);
            }
        }
        out
    }
}
