#!/usr/bin/env bash
# The main job, `esper_pipeline`, on OONA_URL=$1 with its built-in endpoints
# on (OONA_METRICS_ADDR): /metrics is scraped while it runs, and the last
# page must show the publish and end-to-end latency histograms' buckets and
# the handled counts; /healthz and /readyz must have answered 200. The last
# page is kept in $TARGET/main-job-metrics/<scheme>.txt and its latency
# lines are printed.
#
#   bash scripts/main-job.sh memory://
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
url="${1:?usage: main-job.sh OONA_URL}"
scheme="${url%%:*}"

command -v curl >/dev/null 2>&1 || { echo "main-job.sh needs curl (apt-get install -y curl)" >&2; exit 1; }
cargo build -q -p oona --example esper_pipeline --all-features
bin="$TARGET/debug/examples/esper_pipeline"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
out="$TARGET/main-job-metrics"
mkdir -p "$out"

OONA_URL="$url" OONA_METRICS_ADDR="127.0.0.1:$port" "$bin" &
pid=$!
page="" healthy="" ready=""
while kill -0 "$pid" 2>/dev/null; do
    if p="$(curl -sf --max-time 2 "$base/metrics")"; then page="$p"; fi
    [ -n "$healthy" ] || { curl -sf --max-time 2 "$base/healthz" >/dev/null && healthy=yes; } || true
    [ -n "$ready" ] || { curl -sf --max-time 2 "$base/readyz" >/dev/null && ready=yes; } || true
    sleep 0.05
done
rc=0
wait "$pid" || rc=$?
[ "$rc" -eq 0 ] || { echo "main job failed (exit $rc)" >&2; exit "$rc"; }
printf '%s\n' "$page" > "$out/$scheme.txt"
fail() { echo "main job on $url: $*" >&2; exit 1; }
[ -n "$page" ] || fail "/metrics never answered on $base"
[ -n "$healthy" ] || fail "/healthz never answered 200"
[ -n "$ready" ] || fail "/readyz never answered 200"
for want in 'oona_publish_duration_seconds_bucket{' 'oona_delivery_latency_seconds_bucket{' \
    'oona_handled_total{' 'oona_published_total{'; do
    grep -qF "$want" "$out/$scheme.txt" || fail "/metrics has no $want (page in $out/$scheme.txt)"
done
echo "main job on $url: /metrics scraped while it ran (kept in $out/$scheme.txt); its latency lines:"
grep -E '^oona_(publish_duration|delivery_latency)_seconds_(bucket\{[^}]*le="(0.001|0.01|0.1|\+Inf)"|count)' "$out/$scheme.txt" | head -n 16
