//! Semantic lookup cost: embed the final user message (micro-batched), search the scope's HNSW
//! index (10,000 entries), run the near-miss guard. Needs the embedding assets
//! (`scripts/fetch-embed-assets.sh`). Run on an idle machine: `cargo bench -p switchboard-cache
//! --bench semantic`; it also prints p50/p99 latency and lookups/second at concurrency 1 and 32.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard_cache::{
    key::{CacheKey, ScopeKey},
    semantic::{RouteConfig, Semantic, SemanticConfig, SemanticTag},
};
use switchboard_embed::Embedder;
use switchboard_proto::chat::v1::{ChatRequest, Message, Role};

const ENTRIES: u32 = 10_000;

fn setup(runtime: &tokio::runtime::Runtime) -> (Arc<Semantic>, Vec<ChatRequest>) {
    let mut config = SemanticConfig {
        enabled: true,
        max_entries_per_scope: ENTRIES as usize + 10,
        // SEMANTIC_BENCH_THREADS=n sets ONNX Runtime's intra-op threads (default: one per core).
        intra_threads: std::env::var("SEMANTIC_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..SemanticConfig::default()
    };
    config.routes.insert("fast".into(), RouteConfig::default());
    let embedder = Embedder::shared(&config.embed_options()).expect("embedding assets");
    let semantic = Arc::new(Semantic::new(config, embedder.clone()));
    let request = |text: String| ChatRequest {
        model: "fast".into(),
        messages: vec![Message::text(Role::User, &text)],
        ..Default::default()
    };
    let (scope, _) = ScopeKey::of("bench", "", &request("x".into())).unwrap();
    // The scope is filled with clusters, as real traffic fills it (paraphrases of the same few
    // hundred questions): 100 embedded questions, each with 100 perturbed copies at a cosine of
    // about 0.8 to it. (Uniformly random unit vectors, which this bench used first, make HNSW
    // degenerate: every point is about equally far from every other, so a search visits much of the
    // graph and the search cost is overstated several times.)
    let bases: Vec<String> = (0..100)
        .map(|i| {
            format!("How do I configure feature number {i} of the billing system for my team?")
        })
        .collect();
    let base_refs: Vec<&str> = bases.iter().map(String::as_str).collect();
    let centres = runtime
        .block_on(embedder.embed_all(&base_refs))
        .expect("embedding the cluster centres");
    let mut x: u32 = 12345;
    let expires = SystemTime::now() + Duration::from_secs(86_400);
    for i in 0..ENTRIES {
        let centre = &centres[i as usize % centres.len()];
        let mut v: Vec<f32> = centre
            .iter()
            .map(|c| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Uniform noise of standard deviation ~0.038 per dimension: |noise| ~0.75.
                c + ((x as f32 / u32::MAX as f32) - 0.5) * 0.13
            })
            .collect();
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter_mut().for_each(|a| *a /= norm);
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        let tag = SemanticTag {
            scope,
            vector: v.into(),
            text: format!("synthetic question {i}"),
        };
        semantic.on_insert("bench", CacheKey(key), &tag, expires);
    }
    // ... and real questions are looked up.
    let questions: Vec<ChatRequest> = (0..64)
        .map(|i| {
            request(format!(
                "How do I reset the password of account number {i} on my phone?"
            ))
        })
        .collect();
    runtime.block_on(async {
        for q in &questions[..4] {
            semantic.find("bench", "", q).await.unwrap();
        }
    });
    (semantic, questions)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (semantic, questions) = setup(&runtime);
    let mut group = c.benchmark_group("semantic");
    group.throughput(Throughput::Elements(1));
    group.bench_function("lookup_1", |b| {
        let mut i = 0;
        b.to_async(&runtime).iter(|| {
            i = (i + 1) % questions.len();
            let (semantic, q) = (Arc::clone(&semantic), questions[i].clone());
            async move { semantic.find("bench", "", &q).await.unwrap() }
        });
    });
    group.throughput(Throughput::Elements(32));
    group.bench_function("lookup_32_concurrent", |b| {
        b.to_async(&runtime).iter(|| {
            let semantic = Arc::clone(&semantic);
            let batch: Vec<ChatRequest> = questions[..32].to_vec();
            async move {
                let calls = batch.iter().map(|q| semantic.find("bench", "", q));
                futures::future::join_all(calls).await
            }
        });
    });
    group.finish();

    // p50 / p99 and lookups per second, outside criterion's statistics.
    for concurrency in [1usize, 32] {
        let rounds = if concurrency == 1 { 400 } else { 20 };
        let (latencies, elapsed) = runtime.block_on(async {
            let mut latencies = Vec::new();
            let started = Instant::now();
            for round in 0..rounds {
                let calls = (0..concurrency).map(|j| {
                    let semantic = Arc::clone(&semantic);
                    let q = questions[(round + j) % questions.len()].clone();
                    async move {
                        let t = Instant::now();
                        semantic.find("bench", "", &q).await.unwrap();
                        t.elapsed()
                    }
                });
                latencies.extend(futures::future::join_all(calls).await);
            }
            (latencies, started.elapsed())
        });
        let n = latencies.len();
        let (p50, p99) = percentiles(latencies);
        println!(
            "semantic lookup, concurrency {concurrency}: p50 {:.2} ms, p99 {:.2} ms, {:.0} lookups/s ({n} lookups, {} entries in the scope)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            n as f64 / elapsed.as_secs_f64(),
            ENTRIES
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
