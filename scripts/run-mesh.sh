#!/usr/bin/env bash
# Runs the whole mesh locally without Docker: starts Postgres and NATS if they are down, then the five
# services in one process (each on its own port, real gRPC between them) plus the FAKE provider as a
# demo backend. Ctrl-C stops it.
#   HTTP (OpenAI-compatible): http://127.0.0.1:8080   gRPC gateway: 127.0.0.1:50051   demo key: sk-switchboard-demo
# Extra arguments go to `switchboard run` (e.g. --config my.toml). Set SWITCHBOARD_NO_FAKE=1 to skip the fake provider.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-services.sh
cargo build --release -p switchboard
fake=(--with-fake-provider 127.0.0.1:9090)
[ "${SWITCHBOARD_NO_FAKE:-}" = "1" ] && fake=()
config=(--config deploy/switchboard.example.toml)
for arg in "$@"; do [ "$arg" = "--config" ] && config=(); done
exec target/release/switchboard run "${config[@]}" "${fake[@]}" "$@"
