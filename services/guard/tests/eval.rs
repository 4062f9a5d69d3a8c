//! Smoke test of the evaluation on tiny fixtures written for this project (not the shared data).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use switchboard_guard::eval::{self, InjectionRow, PiiRow};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn pii_report_counts_exact_and_overlapping_matches() {
    let rows: Vec<PiiRow> = eval::read_jsonl(&fixture("pii_tiny.jsonl")).unwrap();
    assert_eq!(rows.len(), 6);
    let report = eval::evaluate_pii(&rows).unwrap();
    let get = |entity: &str| {
        report
            .entities
            .iter()
            .find(|e| e.entity_type == entity)
            .unwrap_or_else(|| panic!("{entity} in {report:?}"))
    };
    let person = get("PERSON");
    assert_eq!((person.support, person.exact.true_positives), (2, 1));
    assert!((person.exact.recall - 0.5).abs() < 1e-9);
    let location = get("LOCATION");
    assert_eq!((location.support, location.exact.true_positives), (2, 2));
    let address = get("STREET_ADDRESS");
    assert_eq!(address.exact.true_positives, 1);
    for entity in ["EMAIL_ADDRESS", "CREDIT_CARD"] {
        assert!((get(entity).exact.f1 - 1.0).abs() < 1e-9, "{entity}");
    }
    assert!(report.micro.overlap.recall >= report.micro.exact.recall);
    assert_eq!(report.unsupported.get("ORGANIZATION"), Some(&1));
    assert!(eval::pii_table(&report).contains("PERSON"));
}

#[test]
fn injection_report_has_rates_at_the_default_threshold_and_at_one_percent() {
    let rows: Vec<InjectionRow> = eval::read_jsonl(&fixture("injection_tiny.jsonl")).unwrap();
    let report = eval::evaluate_injection(&rows, 0.5).unwrap();
    assert_eq!((report.all.attacks, report.all.benign), (3, 4));
    assert!((report.all.tpr_at_default - 1.0).abs() < 1e-9, "{report:?}");
    assert_eq!(report.all.fpr_at_default, 0.0, "{report:?}");
    // With 4 benign rows, 1% allows none: the threshold is above every benign score.
    assert_eq!(report.all.fpr_at_1pct_fpr, 0.0);
    assert!(report.all.threshold_at_1pct_fpr > 0.0);
    assert!(eval::injection_table(&report).contains("TPR"));
}

#[test]
fn the_command_skips_missing_files_and_reports_fixtures() {
    let bin = env!("CARGO_BIN_EXE_guard-eval");
    let missing = std::process::Command::new(bin)
        .args([
            "--pii",
            "/nonexistent/pii.jsonl",
            "--injection",
            "/nonexistent/p.jsonl",
        ])
        .output()
        .unwrap();
    assert!(missing.status.success());
    let out = String::from_utf8(missing.stdout).unwrap();
    assert!(
        out.contains("pii: skipped, /nonexistent/pii.jsonl not found"),
        "{out}"
    );
    assert!(out.contains("injection: skipped"), "{out}");
    let json = std::process::Command::new(bin)
        .arg("--pii")
        .arg(fixture("pii_tiny.jsonl"))
        .arg("--injection")
        .arg(fixture("injection_tiny.jsonl"))
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(json.status.success());
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["pii"]["rows"], 6);
    assert_eq!(value["injection"]["all"]["attacks"], 3);
}

#[test]
fn errors_list_each_missed_and_false_span_with_its_context() {
    let rows: Vec<PiiRow> = eval::read_jsonl(&fixture("pii_tiny.jsonl")).unwrap();
    let report = eval::evaluate_pii(&rows).unwrap();
    let errors = eval::pii_errors(&rows, &[]).unwrap();
    // As many misses per type as gold spans without an exact match, and as many false hits as
    // predictions without one.
    for score in &report.entities {
        let missed = errors
            .iter()
            .filter(|e| e.kind == "missed" && e.entity_type == score.entity_type)
            .count();
        let wrong = errors
            .iter()
            .filter(|e| e.kind == "false" && e.entity_type == score.entity_type)
            .count();
        assert_eq!(
            missed,
            score.support - score.exact.true_positives,
            "{score:?}"
        );
        assert_eq!(
            wrong,
            score.predicted - score.exact.true_positives,
            "{score:?}"
        );
    }
    let person = errors
        .iter()
        .find(|e| e.kind == "missed" && e.entity_type == "PERSON")
        .unwrap();
    assert!(person.context.contains(&person.value));
    // Types the guard does not recognise are not listed.
    assert!(errors.iter().all(|e| e.entity_type != "ORGANIZATION"));
    // Restricted to one type.
    let only = eval::pii_errors(&rows, &["CREDIT_CARD".to_owned()]).unwrap();
    assert!(only.iter().all(|e| e.entity_type == "CREDIT_CARD"));

    // The command writes them as JSON lines.
    let out = std::env::temp_dir().join(format!("guard-eval-errors-{}.jsonl", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_guard-eval"))
        .arg("--pii")
        .arg(fixture("pii_tiny.jsonl"))
        .args(["--injection", "/nonexistent/p.jsonl", "--errors"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success());
    let written = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(written.lines().count(), errors.len());
    for line in written.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            matches!(value["kind"].as_str(), Some("missed" | "false")),
            "{line}"
        );
    }
}
