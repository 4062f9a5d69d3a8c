#!/usr/bin/env bash
# The load benchmark (issue 3): builds the release binaries, starts Postgres and NATS when they are
# down, fetches the embedding model when it is missing, then runs target/release/switchboard-bench
# with the given arguments.
#
#   scripts/bench.sh                          # full run (~10 minutes), results in target/bench/results.json
#   scripts/bench.sh --quick                  # ~1-minute smoke run
#   scripts/bench.sh --scenario gateway-grpc-1k   # one scenario (plus its direct baseline)
#   scripts/bench.sh --list                   # scenario names
#
# See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
scripts/dev-services.sh
scripts/fetch-embed-assets.sh   # the semantic-hit scenario loads the embedding model
mkdir -p target/bench
exec target/release/switchboard-bench "$@"
