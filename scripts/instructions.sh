#!/usr/bin/env bash
# Instructions per request of the services, counted by valgrind's callgrind: a measure of their CPU
# cost that does not depend on how fast (or how loaded) the machine is, for A/B comparisons on a
# machine too slow or too noisy for the load benchmark's CPU seconds (docs/BENCHMARKS.md).
#
# Runs the load benchmark twice on one scenario, at a low rate and a higher one, with the chosen
# services under callgrind (the others run as usual). Startup, readiness probes, timers and the
# ledger check cost the same in both runs; the difference, divided by the difference in requests
# sent, is what one more request costs each service.
#
#   scripts/instructions.sh                                   # gateway, router, guard on gateway-http-1k
#   scripts/instructions.sh --scenario stream-grpc --services gateway,router
#   scripts/instructions.sh --bin-dir /tmp/ab-old             # another build's binaries
#
# Options: --scenario NAME (default gateway-http-1k), --services a,b (default gateway,router,guard),
# --rates LOW,HIGH (default 10,40), --duration-secs N (default 15), --bin-dir DIR (default
# target/release), --out DIR (default target/bench/instructions). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=gateway-http-1k
services=gateway,router,guard
rates=10,40
duration=15
bin_dir=target/release
out=target/bench/instructions
while [ $# -gt 0 ]; do
    case "$1" in
        --scenario) scenario=$2; shift 2 ;;
        --services) services=$2; shift 2 ;;
        --rates) rates=$2; shift 2 ;;
        --duration-secs) duration=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
bin_dir=$(cd "$bin_dir" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
low=${rates%,*}
high=${rates#*,}
[ "$low" -lt "$high" ] || { echo "--rates LOW,HIGH with LOW < HIGH" >&2; exit 2; }

# A service under callgrind runs tens of times slower: the guard's overload guard would refuse
# checks that wait their turn longer than usual, which is not what is measured here.
export SWITCHBOARD__GUARD__ADMISSION__MAX_WAIT_MS=0

wrapped=$(mktemp -d)
trap 'rm -rf "$wrapped"' EXIT
for path in "$bin_dir"/*; do
    [ -f "$path" ] && [ -x "$path" ] && ln -s "$path" "$wrapped/$(basename "$path")"
done

for rate in "$low" "$high"; do
    for service in ${services//,/ }; do
        [ -x "$bin_dir/$service" ] || { echo "$bin_dir/$service is missing" >&2; exit 1; }
        rm -f "$wrapped/$service" "$out/$service.$rate.callgrind"
        # exec: the bench's SIGTERM reaches valgrind, which writes its counts as the service exits.
        cat >"$wrapped/$service" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out/$service.$rate.callgrind --dump-instr=no --compress-strings=no "$bin_dir/$service" "\$@"
EOF
        chmod +x "$wrapped/$service"
    done
    echo "instructions: $scenario at $rate rps, ${duration}s, under callgrind: $services" >&2
    "$bin_dir/switchboard-bench" --bin-dir "$wrapped" --scenario "$scenario" --at-rate "$rate" \
        --duration-secs "$duration" --log-dir "$out/logs.$rate" --out "$out/bench.$rate.json" \
        --request-timeout-secs 60 --ledger-wait-secs 120 >"$out/bench.$rate.txt" 2>&1 \
        || { echo "the bench failed: $out/bench.$rate.txt" >&2; exit 1; }
done

python3 - "$out" "$scenario" "$services" "$low" "$high" <<'EOF'
import json, sys
out, scenario, services, low, high = sys.argv[1:]

def sent(rate):
    bench = json.load(open(f"{out}/bench.{rate}.json"))
    for s in bench["scenarios"]:
        if s["name"] == scenario:
            errors = sum(r["errors_total"] for r in s["runs"])
            if errors:
                sys.exit(f"{scenario} at {rate} rps had {errors} errors: not a measurement")
            return sum(r["sent_total"] for r in s["runs"])
    sys.exit(f"no {scenario} in {out}/bench.{rate}.json")

def total(service, rate):
    for line in open(f"{out}/{service}.{rate}.callgrind"):
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    sys.exit(f"no total in {out}/{service}.{rate}.callgrind")

requests = sent(high) - sent(low)
result = {"scenario": scenario, "rates": [int(low), int(high)], "requests": requests, "per_request": {}}
print(f"{scenario}: {requests} more requests at {high} rps than at {low} rps")
print(f"{'service':<10} {'instructions/request':>22}")
for service in services.split(","):
    per = (total(service, high) - total(service, low)) / requests
    result["per_request"][service] = round(per)
    print(f"{service:<10} {per:>22,.0f}")
json.dump(result, open(f"{out}/instructions.json", "w"), indent=1)
print(f"results: {out}/instructions.json")
EOF
