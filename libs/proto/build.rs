//! Generates the Rust code for `proto/` with tonic-prost-build.
//! protoc: `$PROTOC` wins when set; otherwise the binary shipped in the protoc-bin-vendored crate,
//! so a plain `cargo build` works on a fresh machine.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc: PathBuf = match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let mut files: Vec<PathBuf> = ["chat", "gateway", "router", "cache", "guard", "ledger"]
        .iter()
        .map(|svc| root.join(format!("switchboard/{svc}/v1/{svc}.proto")))
        .collect();
    files.push(root.join("switchboard/ledger/v1/budget.proto"));
    files.push(root.join("switchboard/guard/v1/audit.proto"));
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("switchboard_descriptor.bin"))
        .compile_with_config(
            config,
            &files,
            &[root.clone(), protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
