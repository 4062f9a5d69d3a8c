//! `switchboard check-config` refuses a gateway that accepts requests larger than a hop behind it
//! decodes (each hop's `max_message_bytes` against `gateway.max_body_bytes`).

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn example_config() -> String {
    format!(
        "{}/../../deploy/switchboard.example.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn check(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .args(["check-config", "--config", &example_config()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_raised_body_limit_passes_with_the_hops_defaults() {
    // 32 MiB, the largest the gateway accepts: the hops' 64 MiB default takes it.
    let (code, stderr) = check(&[("SWITCHBOARD__GATEWAY__MAX_BODY_BYTES", "33554432")]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_body_limit_larger_than_a_hop_accepts_is_refused_naming_both_keys() {
    for hop in ["GUARD", "CACHE", "ROUTER"] {
        let key = format!("SWITCHBOARD__{hop}__MAX_MESSAGE_BYTES");
        let (code, stderr) = check(&[
            ("SWITCHBOARD__GATEWAY__MAX_BODY_BYTES", "8388608"),
            (&key, "8388608"),
        ]);
        assert_eq!(code, Some(64), "{hop}: {stderr}");
        assert!(stderr.contains("gateway.max_body_bytes"), "{stderr}");
        let field = format!("{}.max_message_bytes", hop.to_lowercase());
        assert!(stderr.contains(&field), "{stderr}");
        assert!(stderr.contains("16777216"), "{stderr}");
    }
    // The hop's limit raised with it: valid.
    let (code, stderr) = check(&[
        ("SWITCHBOARD__GATEWAY__MAX_BODY_BYTES", "8388608"),
        ("SWITCHBOARD__GUARD__MAX_MESSAGE_BYTES", "16777216"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_body_limit_over_32_mib_is_refused() {
    let (code, stderr) = check(&[("SWITCHBOARD__GATEWAY__MAX_BODY_BYTES", "33554433")]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("gateway.max_body_bytes"), "{stderr}");
}
