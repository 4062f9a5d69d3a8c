//! Incremental Server-Sent Events parser: feed it network reads of any size, get whole events.

/// One event's `data` (multi-line data joined with `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field ("" when absent).
    pub event: String,
    /// The `data:` lines.
    pub data: String,
}

/// Buffers bytes until complete lines, and lines until a blank line ends an event. Lines are read
/// in place: an event costs one allocation, its `data`.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// A new parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one read; returns the events it completed. Whole lines are read where they arrived;
    /// only an unfinished line is kept for the next read.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if self.buffer.is_empty() {
            let used = self.lines(bytes, &mut events);
            self.buffer.extend_from_slice(&bytes[used..]);
        } else {
            self.buffer.extend_from_slice(bytes);
            let buffer = std::mem::take(&mut self.buffer);
            let used = self.lines(&buffer, &mut events);
            self.buffer = buffer;
            self.buffer.drain(..used);
        }
        events
    }

    /// Reads the complete lines of `input` into events; returns how many bytes they took.
    fn lines(&mut self, input: &[u8], events: &mut Vec<SseEvent>) -> usize {
        let mut start = 0;
        while let Some(offset) = memchr::memchr2(b'\n', b'\r', &input[start..]) {
            let end = start + offset;
            // A `\r` at the very end may be the first half of `\r\n`: wait for the next read.
            if input[end] == b'\r' && end + 1 == input.len() {
                break;
            }
            if let Some(event) = self.line(&input[start..end]) {
                events.push(event);
            }
            start = end + 1;
            if input[end] == b'\r' && input.get(end + 1) == Some(&b'\n') {
                start += 1;
            }
        }
        start
    }

    /// Whether bytes of an unfinished event are pending (the stream was cut mid-event).
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty() || self.has_data
    }

    /// One line, without its end. Invalid UTF-8 is replaced (U+FFFD); `:` is ASCII, so splitting
    /// the field from the value first changes nothing.
    fn line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            if !self.has_data {
                self.event.clear();
                return None;
            }
            let event = SseEvent {
                event: std::mem::take(&mut self.event),
                data: std::mem::take(&mut self.data),
            };
            self.has_data = false;
            return Some(event);
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&text(value));
                self.has_data = true;
            }
            b"event" => self.event = text(value).into_owned(),
            _ => {}
        }
        None
    }
}

/// The bytes as text, invalid UTF-8 replaced (the validation is the fast one when all is valid).
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn whole_events() {
        let mut parser = SseParser::new();
        let events = parser.push(b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(data(&events), vec!["{\"a\":1}", "[DONE]"]);
        assert!(!parser.has_partial());
    }

    #[test]
    fn events_split_across_reads_at_every_byte() {
        let input = "data: {\"text\":\"héllo\"}\r\n\r\n: keep-alive\n\nevent: message\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n";
        let bytes = input.as_bytes();
        for split in 0..bytes.len() {
            let mut parser = SseParser::new();
            let mut events = parser.push(&bytes[..split]);
            events.extend(parser.push(&bytes[split..]));
            assert_eq!(
                data(&events),
                vec!["{\"text\":\"héllo\"}", "line1\nline2", "[DONE]"],
                "split at {split}"
            );
            assert_eq!(events[1].event, "message");
        }
        // One byte at a time.
        let mut parser = SseParser::new();
        let events: Vec<SseEvent> = bytes
            .iter()
            .flat_map(|b| parser.push(std::slice::from_ref(b)))
            .collect();
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn empty_and_bare_data_lines_and_invalid_utf8() {
        let mut parser = SseParser::new();
        let events =
            parser.push(b"data:\ndata: b\n\ndata\n\nevent: e\xff\ndata:  two spaces\xc3\n\n");
        assert_eq!(data(&events), vec!["\nb", "", " two spaces\u{FFFD}"]);
        assert_eq!(events[2].event, "e\u{FFFD}");
        assert_eq!(events[0].event, "");
        assert!(!parser.has_partial());
    }

    #[test]
    fn a_cut_event_is_partial() {
        let mut parser = SseParser::new();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        assert!(parser.has_partial());
        let mut parser = SseParser::new();
        assert!(parser.push(b"data: x\n").is_empty());
        assert!(parser.has_partial());
    }
}
