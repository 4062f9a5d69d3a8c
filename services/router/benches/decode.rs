//! CPU cost of decoding a provider's streamed answer in the router (SSE parsing and the provider
//! format's decoder; no network): `cargo bench -p switchboard-router --bench decode` (on an idle
//! machine). The OpenAI answer is 20 content chunks (the fake provider's stream scenario of
//! `switchboard-bench`), then the finish, usage and `[DONE]` events; it arrives in one read (a fast
//! provider's burst) or in one read per event. The Gemini answer is 20 events of text, the last with
//! the finish reason and usage. The Anthropic answer is a Messages stream: `message_start`, a text
//! block with 20 `text_delta`s, `content_block_stop`, `message_delta` (stop reason and usage),
//! `message_stop`, with a `ping`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard_router::{ProviderKind, bench_support::decode_stream};

fn chunk(delta: &str, finish: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-8f3b2c\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\
         \"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_fake\",\"choices\":[{{\"index\":0,\
         \"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
    )
}

/// The events of one answer, one string each.
fn events() -> Vec<String> {
    let mut events = vec![chunk(
        r#"{"role":"assistant","content":"","refusal":null}"#,
        "null",
    )];
    for i in 0..20 {
        events.push(chunk(
            &format!(r#"{{"content":"word{i} of the answer, "}}"#),
            "null",
        ));
    }
    events.push(chunk("{}", "\"stop\""));
    events.push(
        "data: {\"id\":\"chatcmpl-8f3b2c\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\
         \"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\
         \"completion_tokens\":120,\"total_tokens\":370}}\n\n"
            .to_owned(),
    );
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// Gemini's `streamGenerateContent?alt=sse` events.
fn gemini_events() -> Vec<String> {
    (0..20)
        .map(|i| {
            let last = if i == 19 {
                r#","finishReason":"STOP""#
            } else {
                ""
            };
            let usage = if i == 19 {
                r#","usageMetadata":{"promptTokenCount":250,"candidatesTokenCount":120,"totalTokenCount":370}"#
            } else {
                ""
            };
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"word{i} of the answer, \"}}],\
                 \"role\":\"model\"}},\"index\":0{last}}}]{usage},\"modelVersion\":\"gemini-2.5-flash\",\
                 \"responseId\":\"mVd3aO2kJ8zW\"}}\r\n\r\n"
            )
        })
        .collect()
}

/// Anthropic's Messages stream events.
fn anthropic_events() -> Vec<String> {
    let event = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":250,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        ),
        event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        event("ping", r#"{"type": "ping"}"#),
    ];
    for i in 0..20 {
        events.push(event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"word{i} of the answer, "}}}}"#
            ),
        ));
    }
    events.push(event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    events.push(event(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":120}}"#,
    ));
    events.push(event("message_stop", r#"{"type":"message_stop"}"#));
    events
}

fn decode(c: &mut Criterion) {
    let events = events();
    let whole = events.concat();
    let mut group = c.benchmark_group("openai_stream_decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_read", |b| {
        b.iter(|| decode_stream(ProviderKind::Openai, &[black_box(whole.as_bytes())]))
    });
    let reads: Vec<&[u8]> = events.iter().map(String::as_bytes).collect();
    group.bench_function("read_per_event", |b| {
        b.iter(|| decode_stream(ProviderKind::Openai, black_box(&reads)))
    });
    group.finish();
    assert_eq!(decode_stream(ProviderKind::Openai, &reads), 23);

    let gemini = gemini_events().concat();
    let mut group = c.benchmark_group("gemini_stream_decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_read", |b| {
        b.iter(|| decode_stream(ProviderKind::Gemini, &[black_box(gemini.as_bytes())]))
    });
    group.finish();
    assert!(decode_stream(ProviderKind::Gemini, &[gemini.as_bytes()]) >= 20);

    let anthropic = anthropic_events().concat();
    let mut group = c.benchmark_group("anthropic_stream_decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_read", |b| {
        b.iter(|| decode_stream(ProviderKind::Anthropic, &[black_box(anthropic.as_bytes())]))
    });
    group.finish();
    // The role, 20 deltas and the finish.
    assert_eq!(
        decode_stream(ProviderKind::Anthropic, &[anthropic.as_bytes()]),
        22
    );
}

criterion_group!(benches, decode);
criterion_main!(benches);
