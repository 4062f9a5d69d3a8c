//! Needs the assets of `scripts/fetch-embed-assets.sh` (`.cache/embed` or `$SWITCHBOARD_EMBED_DIR`):
//! without them these tests fail, they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, time::Duration};

use switchboard_embed::{EmbedError, EmbedOptions, Embedder, cosine, default_embed_dir};

fn options() -> EmbedOptions {
    let dir = default_embed_dir();
    assert!(
        dir.join("lib/libonnxruntime.so").is_file(),
        "embedding assets missing in {} (run scripts/fetch-embed-assets.sh)",
        dir.display()
    );
    EmbedOptions::in_dir(&dir)
}

#[tokio::test]
async fn the_same_text_gives_the_same_normalised_vector() {
    let embedder = Embedder::shared(&options()).unwrap();
    assert_eq!(embedder.dimension(), 384);
    let a = embedder.embed("How do I reset my password?").await.unwrap();
    let b = embedder.embed("How do I reset my password?").await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 384);
    let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    // Meaning, not bytes: a paraphrase is close, an unrelated sentence is not.
    let paraphrase = embedder
        .embed("What are the steps to change my password?")
        .await
        .unwrap();
    let unrelated = embedder
        .embed("Best recipe for chocolate chip cookies")
        .await
        .unwrap();
    assert!(
        cosine(&a, &paraphrase) > 0.75,
        "{}",
        cosine(&a, &paraphrase)
    );
    assert!(cosine(&a, &unrelated) < 0.3, "{}", cosine(&a, &unrelated));
}

#[tokio::test]
async fn the_model_loads_once_per_process() {
    let a = Embedder::shared(&options()).unwrap();
    let b = Embedder::shared(&options()).unwrap();
    // Both handles feed the same worker: same channel.
    assert!(a.same_model(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_batched_and_equal_single_calls() {
    let texts: Vec<String> = (0..24)
        .map(|i| format!("question number {i} about the weather in city {}", i * 7))
        .collect();
    // A long wait so that the concurrent calls surely share batches.
    let batched = Embedder::load(&EmbedOptions {
        max_wait: Duration::from_millis(200),
        max_batch: 64,
        ..options()
    })
    .unwrap();
    let single = Embedder::load(&EmbedOptions {
        max_batch: 1,
        ..options()
    })
    .unwrap();
    let calls = texts.iter().map(|t| {
        let batched = batched.clone();
        async move { batched.embed(t).await }
    });
    let together = futures::future::join_all(calls).await;
    let stats = batched.stats();
    assert_eq!(stats.texts, 24);
    assert!(
        stats.batches < 24,
        "24 concurrent calls ran as {} batches",
        stats.batches
    );
    for (text, vector) in texts.iter().zip(together) {
        let vector = vector.unwrap();
        let alone = single.embed(text).await.unwrap();
        // Padding inside a batch changes float rounding only.
        let similarity = cosine(&vector, &alone);
        assert!(similarity > 0.9999, "{similarity}");
    }
    assert_eq!(single.stats().batches, 24);
}

#[test]
fn a_missing_model_dir_is_a_typed_error() {
    let missing = PathBuf::from("/nonexistent/switchboard-embed-model");
    let error = Embedder::load(&EmbedOptions {
        model_dir: missing.clone(),
        ..options()
    })
    .unwrap_err();
    match &error {
        EmbedError::MissingAsset { path } => assert!(path.starts_with(&missing), "{error}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.to_string().contains("fetch-embed-assets"));
    let error = Embedder::load(&EmbedOptions {
        ort_library: PathBuf::from("/nonexistent/libonnxruntime.so"),
        ..options()
    })
    .unwrap_err();
    assert!(matches!(error, EmbedError::MissingAsset { .. }), "{error}");
}
