//! Scan throughput of the guard's check (normalise, every recogniser, policy, rewrite) on 2 KB and
//! 50 KB prompts, and of the prompt-injection detector and content filters alone:
//! `cargo bench -p switchboard-guard --bench scan` (on an idle machine).
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard_guard::{
    Config, Direction, Guard, RoutePolicyConfig, TopicConfig, recognizer::KNOWN_ENTITIES,
};
use switchboard_proto::chat::v1::{Message, Role};

/// Prose with a few entities per kilobyte, numbers that are not entities and some code.
const PARAGRAPH: &str = "Hello team, following up on order 4111111111111112 from last week: the \
customer (jane.doe@example.com, phone +1 202-555-0123) says the invoice 2024-01-31 was charged \
twice. Our server at 10.20.30.40 logged version 1.2.3.4.5 of the client, and the build id \
9f86d081884c7d659a2feaa0c55ad015a3bf4f1b. Please refund to card 4111 1111 1111 1111 and confirm. \
Meanwhile, the config has `let x = std::env::var(\"HOME\")?;` and a list: 12, 34, 56, 78, 90. \
";

fn prompt(bytes: usize, accented: bool) -> Vec<Message> {
    let mut text = String::with_capacity(bytes + PARAGRAPH.len());
    while text.len() < bytes {
        text.push_str(PARAGRAPH);
        if accented {
            text.push_str("Café déjà vu — naïve façade, «quoted» text. ");
        }
    }
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    vec![
        Message::text(Role::System, "You are a helpful support assistant."),
        Message::text(Role::User, text),
    ]
}

fn guard(action: &str) -> Guard {
    Guard::new(&Config {
        entities: KNOWN_ENTITIES.iter().map(|e| (*e).to_owned()).collect(),
        default_action: action.to_owned(),
        ..Config::default()
    })
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let redact = guard("redact");
    let pseudonymize = guard("pseudonymize");
    let mut group = c.benchmark_group("check");
    for (name, size, accented) in [
        ("2KB", 2 * 1024, false),
        ("50KB", 50 * 1024, false),
        ("2KB_non_ascii", 2 * 1024, true),
        ("50KB_non_ascii", 50 * 1024, true),
    ] {
        let messages = prompt(size, accented);
        let bytes: usize = messages.iter().map(|m| m.joined_text().len()).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("redact/{name}"), |b| {
            b.iter(|| {
                redact
                    .check("web", Direction::Prompt, black_box(&messages))
                    .unwrap()
            })
        });
        if !accented {
            group.bench_function(format!("pseudonymize/{name}"), |b| {
                b.iter(|| {
                    pseudonymize
                        .check("web", Direction::Prompt, black_box(&messages))
                        .unwrap()
                })
            });
        }
    }
    group.finish();

    // One recogniser at a time on the 2 KB prompt: where the time goes.
    let messages = prompt(2 * 1024, false);
    let mut group = c.benchmark_group("entity_2KB");
    for entity in KNOWN_ENTITIES {
        let guard = Guard::new(&Config {
            entities: vec![(*entity).to_owned()],
            ..Config::default()
        })
        .unwrap();
        group.bench_function(*entity, |b| {
            b.iter(|| {
                guard
                    .check("web", Direction::Prompt, black_box(&messages))
                    .unwrap()
            })
        });
    }
    group.finish();

    // Injection detection and content filters without recognisers, on the default route
    // (injection off, no topics) and on a route with both.
    let topics = [
        (
            "weapons",
            &[
                "pipe bomb",
                "nerve agent",
                "ricin",
                "sarin",
                "3d printed gun",
            ][..],
        ),
        (
            "finance",
            &["stock tip", "insider trading", "pump and dump"][..],
        ),
        (
            "competitors",
            &["acme corp", "globex", "initech", "umbrella corporation"][..],
        ),
    ];
    let detectors = Guard::new(&Config {
        entities: Vec::new(),
        injection_action: "off".into(),
        topics: topics
            .iter()
            .map(|(name, terms)| {
                (
                    (*name).to_owned(),
                    TopicConfig {
                        terms: terms.iter().map(|t| (*t).to_owned()).collect(),
                        patterns: vec![r"\b(buy|sell) \d+ shares\b".to_owned()],
                    },
                )
            })
            .collect(),
        routes: [
            (
                "injection".to_owned(),
                RoutePolicyConfig {
                    injection_action: Some("flag".into()),
                    ..Default::default()
                },
            ),
            (
                "topics".to_owned(),
                RoutePolicyConfig {
                    denied_topics: Some(topics.iter().map(|(n, _)| (*n).to_owned()).collect()),
                    ..Default::default()
                },
            ),
        ]
        .into(),
        ..Config::default()
    })
    .unwrap();
    let mut group = c.benchmark_group("detectors");
    for (name, size) in [("2KB", 2 * 1024), ("50KB", 50 * 1024)] {
        let messages = prompt(size, false);
        let bytes: usize = messages.iter().map(|m| m.joined_text().len()).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        // The injection detector's two parts alone, on the lower-cased text.
        let text: String = messages.iter().map(|m| m.joined_text()).collect();
        let lowered = text.to_lowercase();
        let heuristics = switchboard_guard::injection::Heuristics::new().unwrap();
        group.bench_function(format!("injection_heuristics/{name}"), |b| {
            b.iter(|| heuristics.score(black_box(&text), black_box(&lowered)))
        });
        group.bench_function(format!("injection_features/{name}"), |b| {
            let mut buckets = Vec::new();
            b.iter(|| {
                switchboard_guard::injection::model::features(black_box(&lowered), &mut buckets);
                buckets.len()
            })
        });
        for route in ["injection", "topics"] {
            group.bench_function(format!("{route}/{name}"), |b| {
                b.iter(|| {
                    detectors
                        .check_route("web", route, Direction::Prompt, black_box(&messages))
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
