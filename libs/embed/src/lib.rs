//! Sentence embeddings for Switchboard, fully offline.
//!
//! The model (all-MiniLM-L6-v2 by default) is an ONNX file plus tokenizer files in a local
//! directory, run by ONNX Runtime loaded from a local `libonnxruntime.so`
//! (`scripts/fetch-embed-assets.sh` puts both under `.cache/embed`). Nothing here ever calls a
//! model hub.
//!
//! [`Embedder::shared`] loads a model once per process (per model directory) and returns a cheap
//! handle. [`Embedder::embed`] is async and micro-batches: calls go to one blocking worker thread,
//! which takes every queued text up to [`EmbedOptions::max_batch`], waiting at most
//! [`EmbedOptions::max_wait`] for more after the first, and runs them as one model call. Vectors
//! are L2-normalised, so the dot product of two of them is their cosine similarity.
//!
//! Errors never carry the embedded text.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};
use tokio::sync::oneshot;

/// The files a model directory must hold.
pub const MODEL_FILES: [&str; 5] = [
    "model.onnx",
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

/// The default model's directory name under `<embed dir>/models/`.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A model or runtime file is missing.
    #[error("embedding asset missing: {path} (run scripts/fetch-embed-assets.sh)")]
    MissingAsset { path: PathBuf },
    /// A file exists but could not be read.
    #[error("cannot read embedding asset {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// ONNX Runtime could not be loaded from the library.
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Runtime { path: PathBuf, reason: String },
    /// ONNX Runtime was already loaded from another library in this process.
    #[error("ONNX Runtime already loaded from {loaded}, not {requested}")]
    RuntimeConflict { loaded: PathBuf, requested: PathBuf },
    /// The model could not be built from its files.
    #[error("cannot load the embedding model from {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    /// The model failed on a batch.
    #[error("embedding failed: {0}")]
    Inference(String),
    /// The model returned an unexpected number of vectors.
    #[error("embedding returned {got} vectors for {expected} texts")]
    Shape { expected: usize, got: usize },
    /// The worker thread is gone (it panicked or could not be started).
    #[error("the embedding worker is not running")]
    WorkerGone,
}

/// Where the model is and how it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmbedOptions {
    /// Directory with [`MODEL_FILES`].
    pub model_dir: PathBuf,
    /// Path of `libonnxruntime.so` (>= 1.24).
    pub ort_library: PathBuf,
    /// Most texts embedded in one model call.
    pub max_batch: usize,
    /// After the first queued text, how long the worker waits for more before running a batch.
    pub max_wait: Duration,
    /// ONNX Runtime intra-op threads (`None`: its default, one per core).
    pub intra_threads: Option<usize>,
    /// Longer texts are truncated to this many tokens (256 for all-MiniLM-L6-v2).
    pub max_length: usize,
}

impl EmbedOptions {
    /// The default model and runtime under `embed_dir` (the layout of `fetch-embed-assets.sh`).
    pub fn in_dir(embed_dir: &Path) -> Self {
        EmbedOptions {
            model_dir: embed_dir.join("models").join(DEFAULT_MODEL),
            ort_library: embed_dir.join("lib").join("libonnxruntime.so"),
            max_batch: 32,
            max_wait: Duration::from_millis(1),
            intra_threads: None,
            max_length: 256,
        }
    }
}

/// The embedding directory: `$SWITCHBOARD_EMBED_DIR` if set, else the first `.cache/embed` found
/// in the current directory or one of its ancestors (the workspace's), else `.cache/embed`.
pub fn default_embed_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_EMBED_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let relative = Path::new(".cache").join("embed");
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join(&relative);
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    relative
}

type Reply = oneshot::Sender<Result<Vec<f32>, EmbedError>>;

struct Job {
    text: String,
    reply: Reply,
}

/// A handle on a loaded model; clones share the model and its worker.
#[derive(Clone)]
pub struct Embedder {
    jobs: mpsc::Sender<Job>,
    dimension: usize,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    texts: AtomicU64,
    batches: AtomicU64,
}

/// What the worker has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedStats {
    /// Texts embedded.
    pub texts: u64,
    /// Model calls (batches) run.
    pub batches: u64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Mutex<HashMap<EmbedOptions, Embedder>>> = OnceLock::new();
static RUNTIME: OnceLock<PathBuf> = OnceLock::new();

impl Embedder {
    /// The process-wide embedder for `options`, loading the model on first use. Blocking (the load
    /// takes ~0.3 s): call it at startup or from `spawn_blocking`.
    pub fn shared(options: &EmbedOptions) -> Result<Embedder, EmbedError> {
        let shared = SHARED.get_or_init(|| Mutex::new(HashMap::new()));
        // Holding the lock during the load makes concurrent first calls load once.
        let mut loaded = shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(embedder) = loaded.get(options) {
            return Ok(embedder.clone());
        }
        let embedder = Embedder::load(options)?;
        loaded.insert(options.clone(), embedder.clone());
        Ok(embedder)
    }

    /// Loads a model that is not shared (tests and tools; services use [`Embedder::shared`]).
    pub fn load(options: &EmbedOptions) -> Result<Embedder, EmbedError> {
        init_runtime(&options.ort_library)?;
        let mut model = load_model(options)?;
        let probe = model
            .embed(["dimension probe"], Some(1))
            .map_err(|e| EmbedError::Model {
                path: options.model_dir.clone(),
                reason: e.to_string(),
            })?;
        let dimension = probe.first().map(Vec::len).unwrap_or_default();
        if dimension == 0 {
            return Err(EmbedError::Model {
                path: options.model_dir.clone(),
                reason: "the model returned an empty vector".to_owned(),
            });
        }
        let (jobs, queue) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let max_wait = options.max_wait;
        let counters = Arc::new(Counters::default());
        let worker_counters = Arc::clone(&counters);
        thread::Builder::new()
            .name("embed-worker".to_owned())
            .spawn(move || worker(model, queue, max_batch, max_wait, &worker_counters))
            .map_err(|_| EmbedError::WorkerGone)?;
        tracing::info!(
            dimension,
            max_batch,
            max_wait_us = max_wait.as_micros() as u64,
            "embedding model loaded"
        );
        Ok(Embedder {
            jobs,
            dimension,
            counters,
        })
    }

    /// Whether `other` is a handle on the same loaded model.
    pub fn same_model(&self, other: &Embedder) -> bool {
        Arc::ptr_eq(&self.counters, &other.counters)
    }

    /// Texts and batches embedded so far by this model.
    pub fn stats(&self) -> EmbedStats {
        EmbedStats {
            texts: self.counters.texts.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
        }
    }

    /// Vector length.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The L2-normalised embedding of `text`, batched with concurrent calls.
    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                text: text.to_owned(),
                reply,
            })
            .map_err(|_| EmbedError::WorkerGone)?;
        answer.await.map_err(|_| EmbedError::WorkerGone)?
    }

    /// Embeds every text of `texts` (one queued job each, so they batch with other callers).
    pub async fn embed_all(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut answers = Vec::with_capacity(texts.len());
        for text in texts {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .send(Job {
                    text: (*text).to_owned(),
                    reply,
                })
                .map_err(|_| EmbedError::WorkerGone)?;
            answers.push(answer);
        }
        let mut vectors = Vec::with_capacity(texts.len());
        for answer in answers {
            vectors.push(answer.await.map_err(|_| EmbedError::WorkerGone)??);
        }
        Ok(vectors)
    }
}

/// Cosine similarity of two L2-normalised vectors (their dot product).
///
/// Summed in eight independent lanes: a plain `zip().map().sum()` is one dependency chain the
/// compiler may not reorder (float addition is not associative), so it stays scalar; the lanes let
/// it use SIMD. This is the distance of every HNSW step, so it dominates a semantic lookup's search
/// (it was half of a lookup's CPU, above the embedding, in `cargo bench --bench semantic`).
#[inline]
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0.0f32; LANES];
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn init_runtime(library: &Path) -> Result<(), EmbedError> {
    if !library.is_file() {
        return Err(EmbedError::MissingAsset {
            path: library.to_path_buf(),
        });
    }
    // ort resolves a relative path against the executable's directory: make it absolute first.
    let library = std::fs::canonicalize(library).map_err(|e| EmbedError::Read {
        path: library.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(loaded) = RUNTIME.get() {
        return if *loaded == library {
            Ok(())
        } else {
            Err(EmbedError::RuntimeConflict {
                loaded: loaded.clone(),
                requested: library,
            })
        };
    }
    // init_from dlopen()s the library and checks its version; the builder it returns is not
    // needed (fastembed builds its sessions on the loaded library).
    let _builder = ort::init_from(&library).map_err(|e| EmbedError::Runtime {
        path: library.clone(),
        reason: e.to_string(),
    })?;
    let _ = RUNTIME.set(library);
    Ok(())
}

fn load_model(options: &EmbedOptions) -> Result<TextEmbedding, EmbedError> {
    let dir = &options.model_dir;
    let read = |name: &str| -> Result<Vec<u8>, EmbedError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(EmbedError::MissingAsset { path });
        }
        std::fs::read(&path).map_err(|e| EmbedError::Read {
            path,
            reason: e.to_string(),
        })
    };
    // Check every file first, so a missing directory names the first missing file.
    for name in MODEL_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(EmbedError::MissingAsset { path });
        }
    }
    let model = UserDefinedEmbeddingModel::new(
        read("model.onnx")?,
        TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        },
    )
    // sentence-transformers' all-MiniLM-L6-v2 is mean pooling, then L2 normalisation.
    .with_pooling(Pooling::Mean);
    let mut init = InitOptionsUserDefined::new().with_max_length(options.max_length);
    if let Some(threads) = options.intra_threads {
        init = init.with_intra_threads(threads);
    }
    TextEmbedding::try_new_from_user_defined(model, init).map_err(|e| EmbedError::Model {
        path: dir.clone(),
        reason: e.to_string(),
    })
}

/// The worker: one batch at a time, each as large as the queue allows.
fn worker(
    mut model: TextEmbedding,
    queue: mpsc::Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    counters: &Counters,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    // Ends when every Embedder handle is dropped.
    while let Ok(first) = queue.recv() {
        batch.push(first);
        let deadline = Instant::now() + max_wait;
        while batch.len() < max_batch {
            // Whatever is already queued is taken without waiting.
            match queue.try_recv() {
                Ok(job) => {
                    batch.push(job);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match queue.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .texts
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        run_batch(&mut model, &mut batch);
    }
}

fn run_batch(model: &mut TextEmbedding, batch: &mut Vec<Job>) {
    let texts: Vec<&str> = batch.iter().map(|job| job.text.as_str()).collect();
    let result = model.embed(&texts, Some(texts.len()));
    let jobs = std::mem::take(batch);
    match result {
        Ok(vectors) if vectors.len() == jobs.len() => {
            for (job, vector) in jobs.into_iter().zip(vectors) {
                let _ = job.reply.send(Ok(normalised(vector)));
            }
        }
        Ok(vectors) => {
            let (expected, got) = (jobs.len(), vectors.len());
            for job in jobs {
                let _ = job.reply.send(Err(EmbedError::Shape { expected, got }));
            }
        }
        Err(error) => {
            let reason = error.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(EmbedError::Inference(reason.clone())));
            }
        }
    }
}

fn normalised(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut vector {
            *x /= norm;
        }
    }
    vector
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_in_lanes_matches_the_plain_sum_at_every_length() {
        for len in [0, 1, 7, 8, 9, 31, 384, 385] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 71.0)
                .collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let lanes = cosine(&a, &b);
            assert!(
                (plain - lanes).abs() <= 1e-4 * plain.abs().max(1.0),
                "len {len}: {plain} vs {lanes}"
            );
        }
        let norm = (384.0f32).sqrt();
        let unit = vec![1.0 / norm; 384];
        assert!((cosine(&unit, &unit) - 1.0).abs() < 1e-5);
    }
}
