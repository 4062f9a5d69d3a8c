#!/usr/bin/env bash
# The test command: starts Postgres and NATS if they are down, lints the protos, builds the
# binaries (the multi-process test runs them) and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-services.sh
scripts/fetch-embed-assets.sh
scripts/buf-lint.sh
cargo build --workspace --bins
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
