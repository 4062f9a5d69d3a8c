//! Evaluation of the guard on labelled data (`guard-eval`), and the training of the injection
//! classifier on the training part of a labelled set.
//!
//! PII: JSON lines `{"text": …, "spans": [{"entity_type", "start", "end"}]}` with offsets in
//! characters (Unicode scalar values). Every recogniser runs at the default threshold (0.5) on the
//! normalised text, as the guard does; a predicted span is compared with the gold spans of the same
//! (mapped) entity type:
//! - **exact**: same start and end;
//! - **overlap**: at least one character in common (each gold and each predicted span counts once).
//!
//! Injection: JSON lines `{"text": …, "label": 1|0, "source": …}`. The classifier is trained on the
//! rows for which [`crate::injection::is_held_out`] is false; the headline numbers are on the
//! held-out rows. Reported: the detection rate (TPR) at the default threshold and at the highest
//! threshold-free point with at most 1% false positives on the benign rows.

use std::{collections::BTreeMap, ops::Range, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    guard::Guard,
    injection::{self, model},
    normalize::Normalized,
    recognizer::{self, KNOWN_ENTITIES, Registry},
};

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// A line is not the expected JSON.
    #[error("{path}:{line}: {source}")]
    Json {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
    /// The guard cannot be built.
    #[error(transparent)]
    Startup(#[from] crate::error::StartupError),
    /// The recognisers cannot be built.
    #[error(transparent)]
    Recognizer(#[from] recognizer::BuildError),
}

/// A gold span of the PII set.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldSpan {
    /// Entity type as labelled.
    pub entity_type: String,
    /// Start offset, in characters.
    pub start: usize,
    /// End offset (exclusive), in characters.
    pub end: usize,
}

/// A row of the PII set.
#[derive(Debug, Clone, Deserialize)]
pub struct PiiRow {
    /// The text.
    pub text: String,
    /// Gold spans.
    #[serde(default)]
    pub spans: Vec<GoldSpan>,
}

/// A row of the injection set.
#[derive(Debug, Clone, Deserialize)]
pub struct InjectionRow {
    /// The text.
    pub text: String,
    /// 1 attack, 0 benign.
    pub label: u8,
    /// Where it comes from.
    #[serde(default)]
    pub source: String,
}

/// Reads JSON lines.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, EvalError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: display.clone(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| EvalError::Json {
                path: display.clone(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The guard's entity type for a labelled one (Presidio names; `GPE` is a location), if the guard
/// has a recogniser for it.
pub fn map_entity(label: &str) -> Option<&'static str> {
    let mapped = match label {
        "GPE" | "LOCATION" => recognizer::LOCATION,
        "ADDRESS" => recognizer::STREET_ADDRESS,
        other => other,
    };
    KNOWN_ENTITIES.iter().copied().find(|e| *e == mapped)
}

/// Precision, recall and F1 of one entity type under one span rule.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Prf {
    /// Correct predictions.
    pub true_positives: usize,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
}

impl Prf {
    fn new(true_positives: usize, predicted: usize, support: usize) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(true_positives, predicted);
        let recall = ratio(true_positives, support);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Prf {
            true_positives,
            precision,
            recall,
            f1,
        }
    }
}

/// Scores of one entity type.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EntityScore {
    /// The guard's entity type.
    pub entity_type: String,
    /// Gold spans.
    pub support: usize,
    /// Predicted spans.
    pub predicted: usize,
    /// Exact span match.
    pub exact: Prf,
    /// Overlapping span match.
    pub overlap: Prf,
}

/// The PII report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PiiReport {
    /// Rows evaluated.
    pub rows: usize,
    /// Per entity type the guard recognises and the set labels, sorted.
    pub entities: Vec<EntityScore>,
    /// Micro average over them.
    pub micro: EntityScore,
    /// Labelled entity types the guard has no recogniser for, with their support.
    pub unsupported: BTreeMap<String, usize>,
}

/// Character offsets of a byte range of `text`.
fn char_range(text: &str, range: Range<usize>) -> Range<usize> {
    let start = text[..range.start].chars().count();
    start..start + text[range].chars().count()
}

/// The predicted spans (entity type, character range) of `text`: every recogniser at 0.5 on
/// the normalised view, mapped back to the original.
pub fn predict_entities(registry: &Registry, text: &str) -> Vec<(&'static str, Range<usize>)> {
    let recognizers: Vec<_> = KNOWN_ENTITIES
        .iter()
        .filter_map(|e| Some((registry.get(e)?, 0.5f32)))
        .collect();
    let view = Normalized::new(text);
    recognizer::scan(view.text(), &recognizers, |_, _| false)
        .into_iter()
        .map(|m| (m.entity_type, char_range(text, view.to_original(m.range))))
        .collect()
}

/// Evaluates the recognisers on `rows`.
pub fn evaluate_pii(rows: &[PiiRow]) -> Result<PiiReport, EvalError> {
    let registry =
        Registry::builtin(&[phonenumber::country::Id::US, phonenumber::country::Id::GB])?;
    // entity -> (support, predicted, exact, overlap)
    let mut tallies: BTreeMap<&'static str, [usize; 4]> = BTreeMap::new();
    let mut unsupported: BTreeMap<String, usize> = BTreeMap::new();
    for row in rows {
        let mut gold: Vec<(&'static str, Range<usize>)> = Vec::new();
        for span in &row.spans {
            match map_entity(&span.entity_type) {
                Some(entity) => gold.push((entity, span.start..span.end)),
                None => *unsupported.entry(span.entity_type.clone()).or_default() += 1,
            }
        }
        for (entity, _) in &gold {
            tallies.entry(entity).or_default()[0] += 1;
        }
        let predicted: Vec<(&'static str, Range<usize>)> = predict_entities(&registry, &row.text)
            // Only entity types this data set labels are scored.
            .into_iter()
            .filter(|(e, _)| is_labelled(e))
            .collect();
        let mut exact_used = vec![false; gold.len()];
        let mut overlap_used = vec![false; gold.len()];
        for (entity, range) in &predicted {
            let tally = tallies.entry(entity).or_default();
            tally[1] += 1;
            if let Some(i) = gold
                .iter()
                .enumerate()
                .position(|(i, (e, g))| !exact_used[i] && e == entity && *g == *range)
            {
                exact_used[i] = true;
                tally[2] += 1;
            }
            if let Some(i) = gold.iter().enumerate().position(|(i, (e, g))| {
                !overlap_used[i] && e == entity && g.start < range.end && range.start < g.end
            }) {
                overlap_used[i] = true;
                tally[3] += 1;
            }
        }
    }
    let entities: Vec<EntityScore> = tallies
        .iter()
        .map(
            |(entity, [support, predicted, exact, overlap])| EntityScore {
                entity_type: (*entity).to_owned(),
                support: *support,
                predicted: *predicted,
                exact: Prf::new(*exact, *predicted, *support),
                overlap: Prf::new(*overlap, *predicted, *support),
            },
        )
        .collect();
    let sum = |i: usize| tallies.values().map(|t| t[i]).sum::<usize>();
    let micro = EntityScore {
        entity_type: "ALL".to_owned(),
        support: sum(0),
        predicted: sum(1),
        exact: Prf::new(sum(2), sum(1), sum(0)),
        overlap: Prf::new(sum(3), sum(1), sum(0)),
    };
    Ok(PiiReport {
        rows: rows.len(),
        entities,
        micro,
        unsupported,
    })
}

/// A span the recognisers got wrong: a gold span no prediction matches exactly (`missed`), or a
/// prediction no gold span matches exactly (`false`), with the text around it (for analysis only;
/// the output holds the evaluated data, so it belongs in a scratch directory, never in the repository).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PiiError {
    /// `missed` or `false`.
    pub kind: &'static str,
    /// The guard's entity type.
    pub entity_type: String,
    /// The span's text.
    pub value: String,
    /// Up to 40 characters either side.
    pub context: String,
    /// Predictions of the same type overlapping a missed gold span (boundary errors), or gold
    /// spans of any type the guard recognises overlapping a false prediction.
    pub overlapping: Vec<String>,
}

/// The exact-match errors of the recognisers on `rows` for `entities` (every type when empty).
pub fn pii_errors(rows: &[PiiRow], entities: &[String]) -> Result<Vec<PiiError>, EvalError> {
    let registry =
        Registry::builtin(&[phonenumber::country::Id::US, phonenumber::country::Id::GB])?;
    let wanted = |e: &str| entities.is_empty() || entities.iter().any(|w| w == e);
    let mut out = Vec::new();
    for row in rows {
        let chars: Vec<char> = row.text.chars().collect();
        let slice = |r: &Range<usize>| -> String {
            chars[r.start.min(chars.len())..r.end.min(chars.len())]
                .iter()
                .collect()
        };
        let around = |r: &Range<usize>| slice(&(r.start.saturating_sub(40)..r.end + 40));
        // Gold spans of types the guard has no recogniser for are not errors of the guard.
        let gold: Vec<(String, Range<usize>)> = row
            .spans
            .iter()
            .filter_map(|s| Some((map_entity(&s.entity_type)?.to_owned(), s.start..s.end)))
            .collect();
        let predicted: Vec<(&'static str, Range<usize>)> = predict_entities(&registry, &row.text)
            .into_iter()
            .filter(|(e, _)| is_labelled(e))
            .collect();
        let overlaps = |a: &Range<usize>, b: &Range<usize>| a.start < b.end && b.start < a.end;
        for (entity, range) in &gold {
            if !wanted(entity) || predicted.iter().any(|(e, r)| e == entity && r == range) {
                continue;
            }
            out.push(PiiError {
                kind: "missed",
                entity_type: entity.clone(),
                value: slice(range),
                context: around(range),
                overlapping: predicted
                    .iter()
                    .filter(|(e, r)| e == entity && overlaps(r, range))
                    .map(|(_, r)| slice(r))
                    .collect(),
            });
        }
        for (entity, range) in &predicted {
            if !wanted(entity) || gold.iter().any(|(e, r)| e == entity && r == range) {
                continue;
            }
            out.push(PiiError {
                kind: "false",
                entity_type: (*entity).to_owned(),
                value: slice(range),
                context: around(range),
                overlapping: gold
                    .iter()
                    .filter(|(_, r)| overlaps(r, range))
                    .map(|(e, r)| format!("{e}: {}", slice(r)))
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Entity types of the guard that the PII set labels (the others are not scored: no gold).
fn is_labelled(entity: &str) -> bool {
    matches!(
        entity,
        "PERSON"
            | "STREET_ADDRESS"
            | "LOCATION"
            | "PHONE_NUMBER"
            | "CREDIT_CARD"
            | "EMAIL_ADDRESS"
            | "IP_ADDRESS"
            | "US_SSN"
            | "IBAN_CODE"
    )
}

/// Detection rates on one subset of the injection set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rates {
    /// Attack rows.
    pub attacks: usize,
    /// Benign rows.
    pub benign: usize,
    /// The default threshold.
    pub default_threshold: f32,
    /// Attacks detected at the default threshold.
    pub tpr_at_default: f64,
    /// Benign rows flagged at the default threshold.
    pub fpr_at_default: f64,
    /// The lowest threshold with at most 1% of the benign rows flagged.
    pub threshold_at_1pct_fpr: f32,
    /// Attacks detected there.
    pub tpr_at_1pct_fpr: f64,
    /// Benign rows flagged there.
    pub fpr_at_1pct_fpr: f64,
    /// Detection rate at the default threshold per source (attacks) or false-positive rate
    /// (benign sources).
    pub by_source: BTreeMap<String, f64>,
}

/// The injection report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InjectionReport {
    /// Version of the detector evaluated.
    pub detector_version: String,
    /// The held-out fifth (not used for training): the headline.
    pub held_out: Rates,
    /// Every row (four fifths were used to train the classifier: optimistic).
    pub all: Rates,
    /// The heuristics alone on the held-out rows (no classifier).
    pub heuristics_only_held_out: Rates,
    /// Per attack family (source prefix, e.g. `tensor_trust`): a classifier trained without any
    /// row of that family, scored on that family's attacks and the held-out benign rows (how
    /// the detector does on a kind of attack it has never seen).
    pub unseen_family: BTreeMap<String, Rates>,
}

/// Rates of `scored` (score, label, source).
pub fn rates(scored: &[(f32, u8, &str)], default_threshold: f32) -> Rates {
    let mut benign: Vec<f32> = scored
        .iter()
        .filter(|(_, l, _)| *l == 0)
        .map(|(s, _, _)| *s)
        .collect();
    benign.sort_by(|a, b| b.total_cmp(a));
    let attacks = scored.iter().filter(|(_, l, _)| *l == 1).count();
    // At most 1% of the benign rows at or above the threshold: just above the (k+1)-th highest.
    let allowed = benign.len() / 100;
    let threshold_at_1pct_fpr = benign.get(allowed).map_or(0.0, |s| next_up(*s)).min(1.0);
    #[allow(clippy::cast_precision_loss)]
    let rate = |threshold: f32, label: u8| {
        let (hit, all) = scored
            .iter()
            .filter(|(_, l, _)| *l == label)
            .fold((0usize, 0usize), |(h, a), (s, _, _)| {
                (h + usize::from(*s >= threshold), a + 1)
            });
        if all == 0 {
            0.0
        } else {
            hit as f64 / all as f64
        }
    };
    let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (score, label, source) in scored {
        let entry = by_source
            .entry(format!(
                "{} {source}",
                if *label == 1 { "attack" } else { "benign" }
            ))
            .or_default();
        entry.0 += usize::from(*score >= default_threshold);
        entry.1 += 1;
    }
    #[allow(clippy::cast_precision_loss)]
    let by_source = by_source
        .into_iter()
        .map(|(k, (hit, all))| (k, hit as f64 / all.max(1) as f64))
        .collect();
    Rates {
        attacks,
        benign: benign.len(),
        default_threshold,
        tpr_at_default: rate(default_threshold, 1),
        fpr_at_default: rate(default_threshold, 0),
        threshold_at_1pct_fpr,
        tpr_at_1pct_fpr: rate(threshold_at_1pct_fpr, 1),
        fpr_at_1pct_fpr: rate(threshold_at_1pct_fpr, 0),
        by_source,
    }
}

fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

/// Evaluates the shipped injection detector on `rows` at `default_threshold`.
pub fn evaluate_injection(
    rows: &[InjectionRow],
    default_threshold: f32,
) -> Result<InjectionReport, EvalError> {
    let guard = Guard::new(&Config::default())?;
    let heuristics = injection::Heuristics::new().map_err(recognizer::BuildError::from)?;
    let mut all = Vec::with_capacity(rows.len());
    let mut held = Vec::new();
    let mut heuristic_held = Vec::new();
    for row in rows {
        let score = guard.injection_score(&row.text);
        all.push((score, row.label, row.source.as_str()));
        if injection::is_held_out(&row.text) {
            held.push((score, row.label, row.source.as_str()));
            let view = Normalized::new(&row.text);
            let h = heuristics.score(view.text(), &view.text().to_lowercase());
            heuristic_held.push((h.score, row.label, row.source.as_str()));
        }
    }
    let mut unseen_family = BTreeMap::new();
    let families: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.label == 1)
        .map(|r| family(&r.source))
        .collect();
    for name in families {
        let training: Vec<InjectionRow> = rows
            .iter()
            .filter(|r| !(r.label == 1 && family(&r.source) == name))
            .cloned()
            .collect();
        let detector = injection::Detector::with_model_bytes(&train_injection(&training, 6))
            .map_err(crate::error::StartupError::from)?;
        let scored: Vec<(f32, u8, &str)> = rows
            .iter()
            .filter(|r| {
                (r.label == 1 && family(&r.source) == name)
                    || (r.label == 0 && injection::is_held_out(&r.text))
            })
            .map(|r| {
                (
                    detector.score(Normalized::new(&r.text).text()).score,
                    r.label,
                    r.source.as_str(),
                )
            })
            .collect();
        unseen_family.insert(name.to_owned(), rates(&scored, default_threshold));
    }
    Ok(InjectionReport {
        unseen_family,
        detector_version: injection::Detector::shipped()
            .map_err(crate::error::StartupError::from)?
            .version()
            .to_owned(),
        held_out: rates(&held, default_threshold),
        all: rates(&all, default_threshold),
        heuristics_only_held_out: rates(&heuristic_held, default_threshold),
    })
}

/// The family of a source: what comes before the first `:` (`garak:dan` → `garak`).
fn family(source: &str) -> &str {
    source.split(':').next().unwrap_or(source)
}

/// Trains the classifier on the rows that are not held out; returns the weight file.
pub fn train_injection(rows: &[InjectionRow], epochs: usize) -> Vec<u8> {
    let examples: Vec<model::Example> = rows
        .iter()
        .filter(|r| !injection::is_held_out(&r.text))
        .map(|r| {
            let mut buckets = Vec::new();
            model::features(
                &Normalized::new(&r.text).text().to_lowercase(),
                &mut buckets,
            );
            model::Example {
                buckets,
                label: f32::from(r.label.min(1)),
            }
        })
        .collect();
    model::train(&examples, epochs, 0.2, 1e-5, 0x5eed).to_bytes()
}

/// The PII report as a text table.
pub fn pii_table(report: &PiiReport) -> String {
    let mut out = format!(
        "PII: {} rows, default threshold 0.5, spans compared in characters\n\
         {:<16} {:>7} {:>7} | {:>6} {:>6} {:>6} (exact) | {:>6} {:>6} {:>6} (overlap)\n",
        report.rows, "entity", "gold", "found", "P", "R", "F1", "P", "R", "F1"
    );
    for e in report.entities.iter().chain(std::iter::once(&report.micro)) {
        out.push_str(&format!(
            "{:<16} {:>7} {:>7} | {:>6.3} {:>6.3} {:>6.3}         | {:>6.3} {:>6.3} {:>6.3}\n",
            e.entity_type,
            e.support,
            e.predicted,
            e.exact.precision,
            e.exact.recall,
            e.exact.f1,
            e.overlap.precision,
            e.overlap.recall,
            e.overlap.f1
        ));
    }
    if !report.unsupported.is_empty() {
        let list: Vec<String> = report
            .unsupported
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect();
        out.push_str(&format!(
            "not recognised by the guard: {}\n",
            list.join(", ")
        ));
    }
    out
}

/// The injection report as a text table.
pub fn injection_table(report: &InjectionReport) -> String {
    let mut out = format!("Injection (detector {}):\n", report.detector_version);
    for (name, r) in [
        ("held-out 20% (headline)", &report.held_out),
        (
            "heuristics only, held-out",
            &report.heuristics_only_held_out,
        ),
        ("all rows (80% trained on)", &report.all),
    ] {
        out.push_str(&format!(
            "  {name}: {} attacks, {} benign\n    at default threshold {:.2}: TPR {:.3}, FPR {:.3}\n    at <=1% FPR (threshold {:.3}): TPR {:.3}, FPR {:.3}\n",
            r.attacks,
            r.benign,
            r.default_threshold,
            r.tpr_at_default,
            r.fpr_at_default,
            r.threshold_at_1pct_fpr,
            r.tpr_at_1pct_fpr,
            r.fpr_at_1pct_fpr
        ));
    }
    for (family, r) in &report.unseen_family {
        out.push_str(&format!(
            "  attack family {family} never seen in training: {} attacks vs {} held-out benign\n    at default threshold {:.2}: TPR {:.3}, FPR {:.3}; at <=1% FPR (threshold {:.3}): TPR {:.3}\n",
            r.attacks,
            r.benign,
            r.default_threshold,
            r.tpr_at_default,
            r.fpr_at_default,
            r.threshold_at_1pct_fpr,
            r.tpr_at_1pct_fpr
        ));
    }
    out.push_str(
        "  held-out, per source at the default threshold (attack: detected, benign: flagged):\n",
    );
    for (source, rate) in &report.held_out.by_source {
        out.push_str(&format!("    {source:<60} {rate:.3}\n"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prf_and_char_ranges() {
        let p = Prf::new(2, 4, 8);
        assert!((p.precision - 0.5).abs() < 1e-9 && (p.recall - 0.25).abs() < 1e-9);
        assert!((p.f1 - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(Prf::new(0, 0, 0).f1, 0.0);
        assert_eq!(char_range("Šárka x", 0..7), 0..5);
        assert_eq!(char_range("Šárka x", 8..9), 6..7);
    }

    #[test]
    fn rates_pick_a_threshold_with_at_most_one_percent_false_positives() {
        let mut scored: Vec<(f32, u8, &str)> = (0..200)
            .map(|i| (i as f32 / 200.0, 0u8, "benign"))
            .collect();
        scored.extend((0..10).map(|_| (1.0, 1u8, "attack")));
        scored.push((0.1, 1, "attack"));
        let r = rates(&scored, 0.5);
        assert!(r.fpr_at_1pct_fpr <= 0.01, "{r:?}");
        assert!((r.tpr_at_1pct_fpr - 10.0 / 11.0).abs() < 1e-9, "{r:?}");
        assert!((r.fpr_at_default - 0.5).abs() < 1e-9);
        assert_eq!(r.attacks, 11);
        assert_eq!(r.benign, 200);
    }

    #[test]
    fn labels_map_to_guard_entities() {
        assert_eq!(map_entity("GPE"), Some("LOCATION"));
        assert_eq!(map_entity("PERSON"), Some("PERSON"));
        assert_eq!(map_entity("ORGANIZATION"), None);
    }
}
