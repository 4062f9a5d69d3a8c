//! Precision evaluation of the semantic cache on labelled paraphrase pairs
//! (`../shared/eval/semantic_cache/normalized/pairs_dev.jsonl`, never copied into the repository).
//!
//! For every sampled pair, side A is stored and side B looked up through the real index
//! ([`SemanticIndex`]) and decision rule ([`decide`]):
//! - **per-pair scope** (the primary measure): each pair gets its own scope, so a hit means "the
//!   cache would serve A's answer to B";
//! - **shared scope**: every A in one scope, each B looked up among all of them; a hit on another
//!   pair's A is a false hit too (what a busy scope sees).
//!
//! Reported per threshold, with and without the near-miss guard: the hit rate on true paraphrases,
//! the false-hit rate on non-paraphrases and on hard negatives, and precision (of the hits, the
//! share that are true paraphrases). Pairs are split into two halves by a hash of their id: the
//! default threshold is chosen on half A and the numbers of half B are reported beside it, so that
//! the choice is checked on pairs it did not see.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::BufRead,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::Deserialize;
use switchboard_embed::Embedder;

use super::{Features, NearMiss, SemanticIndex, Verdict};
use crate::key::{CacheKey, ScopeKey};

/// Where the pairs are, relative to a directory that holds `shared/` (the workspace's parent).
pub const PAIRS: &str = "shared/eval/semantic_cache/normalized/pairs_dev.jsonl";

/// The thresholds reported.
pub const THRESHOLDS: [f32; 13] = [
    0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995,
];

/// The evaluation data file: `$SWITCHBOARD_EVAL_DIR/semantic_cache/normalized/pairs_dev.jsonl`,
/// else `shared/eval/...` next to the current directory or one of its ancestors.
pub fn default_pairs_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_EVAL_DIR").filter(|d| !d.is_empty()) {
        let path = Path::new(&dir).join("semantic_cache/normalized/pairs_dev.jsonl");
        return path.is_file().then_some(path);
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|dir| dir.join(PAIRS))
        .find(|path| path.is_file())
}

#[derive(Debug, Deserialize)]
struct Row {
    #[serde(default)]
    id: String,
    #[serde(default)]
    source: String,
    text_a: String,
    text_b: String,
    label: Option<u8>,
    #[serde(default)]
    hard_negative: bool,
}

/// One labelled pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// `source:id`.
    pub id: String,
    /// Stored side.
    pub a: String,
    /// Looked-up side.
    pub b: String,
    /// Same meaning.
    pub paraphrase: bool,
    /// High word overlap, different meaning.
    pub hard_negative: bool,
}

/// Reads the labelled pairs (ambiguous ones, label null, are left out).
pub fn read_pairs(path: &Path) -> std::io::Result<Vec<Pair>> {
    let file = std::fs::File::open(path)?;
    let mut pairs = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let Some(label) = row.label else { continue };
        pairs.push(Pair {
            id: format!("{}:{}", row.source, row.id),
            a: row.text_a,
            b: row.text_b,
            paraphrase: label == 1,
            hard_negative: row.hard_negative,
        });
    }
    Ok(pairs)
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `limit` pairs drawn without replacement with `seed` (all of them when `limit` is larger).
pub fn sample(mut pairs: Vec<Pair>, limit: usize, seed: u64) -> Vec<Pair> {
    let mut state = seed;
    for i in (1..pairs.len()).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        pairs.swap(i, j);
    }
    pairs.truncate(limit);
    pairs
}

/// Which half a pair belongs to (a stable hash of its id).
pub fn half(id: &str) -> usize {
    let mut state = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (splitmix(&mut state) & 1) as usize
}

/// A pair after embedding.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The pair.
    pub pair: Pair,
    /// Cosine similarity of A and B (through a one-entry index).
    pub similarity: f32,
    /// What the guard says about A and B.
    pub near_miss: Option<NearMiss>,
    /// In the shared scope: the nearest A to B was its own A (or another pair's identical A).
    pub shared_nearest_is_own: bool,
    /// In the shared scope: similarity of the nearest A, and whether the guard passes it.
    pub shared_best: (f32, bool),
    /// In the shared scope: the nearest A is B's own text (another pair stored the very question B
    /// asks; in production that lookup is an exact hit, and its answer is right by definition).
    pub shared_nearest_is_query: bool,
    /// In the shared scope: the id of the pair whose A is nearest (empty when none).
    pub shared_nearest_id: String,
}

/// Counts of one configuration on one set of pairs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// True paraphrases.
    pub positives: usize,
    /// Of which hit.
    pub positive_hits: usize,
    /// Non-paraphrases.
    pub negatives: usize,
    /// Of which hit.
    pub negative_hits: usize,
    /// Hard negatives.
    pub hard: usize,
    /// Of which hit.
    pub hard_hits: usize,
}

impl Counts {
    fn add(&mut self, pair: &Pair, hit: bool) {
        if pair.paraphrase {
            self.positives += 1;
            self.positive_hits += usize::from(hit);
        } else {
            self.negatives += 1;
            self.negative_hits += usize::from(hit);
            if pair.hard_negative {
                self.hard += 1;
                self.hard_hits += usize::from(hit);
            }
        }
    }

    /// Of the hits, the share on true paraphrases (1 when there is no hit).
    pub fn precision(&self) -> f64 {
        let hits = self.positive_hits + self.negative_hits;
        if hits == 0 {
            1.0
        } else {
            self.positive_hits as f64 / hits as f64
        }
    }

    fn rate(hits: usize, of: usize) -> f64 {
        if of == 0 {
            0.0
        } else {
            hits as f64 / of as f64
        }
    }

    /// Hit rate on true paraphrases.
    pub fn recall(&self) -> f64 {
        Self::rate(self.positive_hits, self.positives)
    }

    /// False-hit rate on non-paraphrases.
    pub fn false_hits(&self) -> f64 {
        Self::rate(self.negative_hits, self.negatives)
    }

    /// False-hit rate on hard negatives.
    pub fn hard_false_hits(&self) -> f64 {
        Self::rate(self.hard_hits, self.hard)
    }
}

/// Embeds and scores every pair through the real index and guard.
pub async fn score(
    embedder: &Embedder,
    pairs: Vec<Pair>,
) -> Result<Vec<Scored>, switchboard_embed::EmbedError> {
    let mut vectors_a = Vec::with_capacity(pairs.len());
    let mut vectors_b = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(256) {
        let a: Vec<&str> = chunk.iter().map(|p| p.a.as_str()).collect();
        let b: Vec<&str> = chunk.iter().map(|p| p.b.as_str()).collect();
        vectors_a.extend(embedder.embed_all(&a).await?);
        vectors_b.extend(embedder.embed_all(&b).await?);
    }
    let forever = SystemTime::now() + std::time::Duration::from_secs(86_400);
    let key_of = |i: usize| {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        CacheKey(key)
    };
    let features_a: Vec<Arc<Features>> =
        pairs.iter().map(|p| Arc::new(Features::of(&p.a))).collect();
    let features_b: Vec<Features> = pairs.iter().map(|p| Features::of(&p.b)).collect();
    // Per-pair scopes: one index, one scope per pair.
    let per_pair = SemanticIndex::new(1);
    // Shared scope: every A together.
    let shared = SemanticIndex::new(pairs.len().max(1));
    let shared_scope = ScopeKey([0xff; 32]);
    for (i, vector) in vectors_a.iter().enumerate() {
        let mut scope = [0u8; 32];
        scope[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let vector: Arc<[f32]> = vector.as_slice().into();
        per_pair.insert(
            "eval",
            ScopeKey(scope),
            key_of(i),
            Arc::clone(&vector),
            Arc::clone(&features_a[i]),
            forever,
        );
        shared.insert(
            "eval",
            shared_scope,
            key_of(i),
            vector,
            Arc::clone(&features_a[i]),
            forever,
        );
    }
    let ids: std::collections::HashMap<CacheKey, String> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| (key_of(i), p.id.clone()))
        .collect();
    let texts_a: std::collections::HashMap<CacheKey, String> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| (key_of(i), p.a.clone()))
        .collect();
    let mut scored = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.into_iter().enumerate() {
        let mut scope = [0u8; 32];
        scope[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let similarity = per_pair
            .search(ScopeKey(scope), &vectors_b[i], 1)
            .first()
            .map(|c| c.similarity)
            .unwrap_or(-1.0);
        let near_miss = super::guard::near_miss(&features_b[i], &features_a[i]);
        let best = shared.search(shared_scope, &vectors_b[i], 1);
        let shared_nearest_is_query = best
            .first()
            .is_some_and(|c| texts_a.get(&c.key) == Some(&pair.b));
        let shared_nearest_id = best
            .first()
            .and_then(|c| ids.get(&c.key).cloned())
            .unwrap_or_default();
        let (own, shared_best) = match best.first() {
            Some(c) => (
                c.key == key_of(i) || texts_a.get(&c.key) == texts_a.get(&key_of(i)),
                (
                    c.similarity,
                    super::guard::near_miss(&features_b[i], &c.features).is_none(),
                ),
            ),
            None => (false, (-1.0, false)),
        };
        scored.push(Scored {
            pair,
            similarity,
            near_miss,
            shared_nearest_is_own: own,
            shared_best,
            shared_nearest_is_query,
            shared_nearest_id,
        });
    }
    Ok(scored)
}

/// Counts of one threshold, guard on or off, over the pairs of `half` (`None`: all). The verdict
/// is [`super::decide`]'s: below the threshold is a miss, then a near miss is a miss.
pub fn count(scored: &[Scored], threshold: f32, guard: bool, half_of: Option<usize>) -> Counts {
    let mut counts = Counts::default();
    for s in scored
        .iter()
        .filter(|s| half_of.is_none_or(|h| half(&s.pair.id) == h))
    {
        let verdict = if s.similarity < threshold {
            Verdict::BelowThreshold
        } else if guard {
            s.near_miss.map_or(Verdict::Hit, Verdict::NearMiss)
        } else {
            Verdict::Hit
        };
        counts.add(&s.pair, verdict == Verdict::Hit);
    }
    counts
}

/// Shared-scope counts: `positive_hits` are right answers (the pair's own A, or a text identical
/// to it, and a paraphrase; or a stored text identical to B itself), `negative_hits` wrong ones (a
/// non-paraphrase, or another question's answer); `positives` and `negatives` count the lookups by
/// their pair's label.
pub fn count_shared(scored: &[Scored], threshold: f32, guard: bool) -> Counts {
    let mut counts = Counts::default();
    for s in scored {
        let (similarity, passes) = s.shared_best;
        let hit = similarity >= threshold && (!guard || passes);
        let right = (s.shared_nearest_is_own && s.pair.paraphrase) || s.shared_nearest_is_query;
        if s.pair.paraphrase {
            counts.positives += 1;
        } else {
            counts.negatives += 1;
        }
        if hit && right {
            counts.positive_hits += 1;
        } else if hit {
            counts.negative_hits += 1;
        }
    }
    counts
}

/// The lowest threshold whose precision (guard on) reaches `target` with hard-negative false hits
/// at most `max_hard`, on `half_of`.
pub fn choose(
    scored: &[Scored],
    target: f64,
    max_hard: f64,
    half_of: Option<usize>,
) -> Option<f32> {
    (0..=40).map(|i| 0.80 + i as f32 * 0.005).find(|&t| {
        let c = count(scored, t, true, half_of);
        c.precision() >= target && c.hard_false_hits() <= max_hard
    })
}

/// The report, Markdown.
pub fn report(scored: &[Scored]) -> String {
    let mut out = String::new();
    let all = count(scored, 2.0, false, None);
    let _ = writeln!(
        out,
        "pairs: {} ({} paraphrases, {} non-paraphrases of which {} hard negatives)\n",
        scored.len(),
        all.positives,
        all.negatives,
        all.hard
    );
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for s in scored {
        if let Some(r) = s.near_miss {
            *reasons.entry(r.as_str()).or_default() += 1;
        }
    }
    let _ = writeln!(
        out,
        "guard verdicts over all pairs (any similarity): {reasons:?}\n"
    );
    let _ = writeln!(
        out,
        "### Per-pair scope (store A, look up B in its own scope)\n"
    );
    let _ = writeln!(
        out,
        "| threshold | guard | paraphrases served | false hits, non-paraphrases | false hits, hard negatives | precision |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for t in THRESHOLDS {
        for guard in [false, true] {
            let c = count(scored, t, guard, None);
            let _ = writeln!(
                out,
                "| {t:.3} | {} | {:.1}% | {:.2}% | {:.2}% | {:.1}% |",
                if guard { "on" } else { "off" },
                100.0 * c.recall(),
                100.0 * c.false_hits(),
                100.0 * c.hard_false_hits(),
                100.0 * c.precision()
            );
        }
    }
    let _ = writeln!(
        out,
        "\n### Shared scope (every A in one scope; serving another pair's A is a false hit unless its text is B's own)\n"
    );
    let _ = writeln!(
        out,
        "| threshold | guard | right answers per lookup | wrong answers per lookup | precision |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for t in THRESHOLDS {
        for guard in [false, true] {
            let c = count_shared(scored, t, guard);
            let _ = writeln!(
                out,
                "| {t:.3} | {} | {:.2}% | {:.2}% | {:.1}% |",
                if guard { "on" } else { "off" },
                100.0 * c.positive_hits as f64 / (c.positives + c.negatives).max(1) as f64,
                100.0 * c.negative_hits as f64 / (c.positives + c.negatives).max(1) as f64,
                100.0 * c.precision()
            );
        }
    }
    let _ = writeln!(
        out,
        "\n### Held-out check (threshold chosen on half A, reported on half B)\n"
    );
    let default = super::config::DEFAULT_THRESHOLD;
    for (name, h) in [("A", 0), ("B", 1)] {
        let c = count(scored, default, true, Some(h));
        let _ = writeln!(
            out,
            "- default threshold {default:.2}, guard on, half {name}: paraphrases served {:.1}%, false hits {:.2}% (hard {:.2}%), precision {:.1}%",
            100.0 * c.recall(),
            100.0 * c.false_hits(),
            100.0 * c.hard_false_hits(),
            100.0 * c.precision()
        );
    }
    match choose(scored, 0.98, 0.01, Some(0)) {
        Some(t) => {
            for (name, h) in [("A (chosen on)", 0), ("B (held out)", 1)] {
                let c = count(scored, t, true, Some(h));
                let _ = writeln!(
                    out,
                    "- half {name}: threshold {t:.3}, guard on: paraphrases served {:.1}%, false hits {:.2}% (hard {:.2}%), precision {:.1}% ({} pairs)",
                    100.0 * c.recall(),
                    100.0 * c.false_hits(),
                    100.0 * c.hard_false_hits(),
                    100.0 * c.precision(),
                    c.positives + c.negatives
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "- no threshold in [0.80, 1.00] reaches 98% precision with ≤ 1% hard-negative false hits on half A"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str, paraphrase: bool, hard: bool) -> Pair {
        Pair {
            id: id.into(),
            a: String::new(),
            b: String::new(),
            paraphrase,
            hard_negative: hard,
        }
    }

    #[test]
    fn counts_and_rates() {
        let scored = vec![
            Scored {
                pair: pair("1", true, false),
                similarity: 0.95,
                near_miss: None,
                shared_nearest_is_own: true,
                shared_best: (0.95, true),
                shared_nearest_is_query: false,
                shared_nearest_id: String::new(),
            },
            Scored {
                pair: pair("2", true, false),
                similarity: 0.85,
                near_miss: None,
                shared_nearest_is_own: true,
                shared_best: (0.85, true),
                shared_nearest_is_query: false,
                shared_nearest_id: String::new(),
            },
            Scored {
                pair: pair("3", false, true),
                similarity: 0.97,
                near_miss: Some(NearMiss::Numbers),
                shared_nearest_is_own: true,
                shared_best: (0.97, false),
                shared_nearest_is_query: false,
                shared_nearest_id: String::new(),
            },
            Scored {
                pair: pair("4", false, false),
                similarity: 0.5,
                near_miss: None,
                shared_nearest_is_own: false,
                shared_best: (0.96, true),
                shared_nearest_is_query: false,
                shared_nearest_id: String::new(),
            },
        ];
        let off = count(&scored, 0.9, false, None);
        assert_eq!(
            (off.positive_hits, off.negative_hits, off.hard_hits),
            (1, 1, 1)
        );
        assert!((off.precision() - 0.5).abs() < 1e-9);
        let on = count(&scored, 0.9, true, None);
        assert_eq!((on.positive_hits, on.negative_hits), (1, 0));
        assert!((on.precision() - 1.0).abs() < 1e-9);
        let shared = count_shared(&scored, 0.9, true);
        // Pair 4 was served another pair's answer; pair 3's near miss was caught.
        assert_eq!((shared.positive_hits, shared.negative_hits), (1, 1));
        assert_eq!((shared.positives, shared.negatives), (2, 2));

        // Another pair stored B's very text: serving it is right, whatever B's own pair's label.
        let mut same_text = scored;
        same_text[3].shared_nearest_is_query = true;
        let shared = count_shared(&same_text, 0.9, true);
        assert_eq!((shared.positive_hits, shared.negative_hits), (2, 0));
        assert!((shared.precision() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn sampling_is_seeded_and_halves_are_stable() {
        let pairs: Vec<Pair> = (0..100)
            .map(|i| pair(&i.to_string(), i % 2 == 0, false))
            .collect();
        let a: Vec<String> = sample(pairs.clone(), 10, 7)
            .into_iter()
            .map(|p| p.id)
            .collect();
        let b: Vec<String> = sample(pairs.clone(), 10, 7)
            .into_iter()
            .map(|p| p.id)
            .collect();
        let c: Vec<String> = sample(pairs, 10, 8).into_iter().map(|p| p.id).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let ones = (0..1000).filter(|i| half(&i.to_string()) == 1).count();
        assert!((400..600).contains(&ones), "{ones}");
    }
}
