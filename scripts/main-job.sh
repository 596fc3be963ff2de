#!/usr/bin/env bash
# The main job, `esper_pipeline`, on OONA_URL=$1 as two tenants side by side
# (two processes at once, each URL's tenant and namespace replaced by a
# tenant of its own, fresh each run): each prints its own summary table and
# fails unless its counts add up, so a message that crossed tenants fails
# both. Each serves its built-in endpoints (OONA_METRICS_ADDR): /metrics is
# scraped while it runs, and the last page must show the publish and
# end-to-end latency histograms' buckets and the handled counts; /healthz and
# /readyz must have answered 200. The last page is kept in
# $TARGET/main-job-metrics/<scheme>-<tenant>.txt and its latency lines are
# printed.
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
out="$TARGET/main-job-metrics"
mkdir -p "$out"

# tenant_url URL TENANT: URL with tenant TENANT instead of its own tenant
# and namespace.
tenant_url() {
    python3 - "$1" "$2" <<'EOF'
import sys, urllib.parse as up
u = up.urlsplit(sys.argv[1])
q = [(k, v) for k, v in up.parse_qsl(u.query) if k not in ("tenant", "namespace")]
q.append(("tenant", sys.argv[2]))
print(up.urlunsplit(u._replace(query=up.urlencode(q))))
EOF
}

# run_tenant TENANT: one pipeline in TENANT, scraped while it runs.
run_tenant() {
    local tenant="$1" port base page="" healthy="" ready="" rc=0 pid want
    local name="$scheme-$tenant"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    base="http://127.0.0.1:$port"
    local turl
    turl="$(tenant_url "$url" "$tenant")" && [ -n "$turl" ] || { echo "main job: no URL for tenant $tenant" >&2; exit 1; }
    OONA_URL="$turl" OONA_METRICS_ADDR="127.0.0.1:$port" "$bin" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if p="$(curl -sf --max-time 2 "$base/metrics")"; then page="$p"; fi
        [ -n "$healthy" ] || { curl -sf --max-time 2 "$base/healthz" >/dev/null && healthy=yes; } || true
        [ -n "$ready" ] || { curl -sf --max-time 2 "$base/readyz" >/dev/null && ready=yes; } || true
        sleep 0.05
    done
    wait "$pid" || rc=$?
    fail() { echo "main job on $url, tenant $tenant: $*" >&2; exit 1; }
    [ "$rc" -eq 0 ] || fail "failed (exit $rc)"
    printf '%s\n' "$page" > "$out/$name.txt"
    [ -n "$page" ] || fail "/metrics never answered on $base"
    [ -n "$healthy" ] || fail "/healthz never answered 200"
    [ -n "$ready" ] || fail "/readyz never answered 200"
    for want in 'oona_publish_duration_seconds_bucket{' 'oona_delivery_latency_seconds_bucket{' \
        'oona_handled_total{' 'oona_published_total{'; do
        grep -qF "$want" "$out/$name.txt" || fail "/metrics has no $want (page in $out/$name.txt)"
    done
    echo "main job on $url, tenant $tenant: /metrics scraped while it ran (kept in $out/$name.txt); its latency lines:"
    grep -E '^oona_(publish_duration|delivery_latency)_seconds_(bucket\{[^}]*le="(0.001|0.01|0.1|\+Inf)"|count)' "$out/$name.txt" | head -n 16
}

# Each tenant runs in a subshell (its `exit` ends only it), its output kept
# apart and printed whole, so the two tables do not interleave.
run="$(python3 -c 'import uuid; print(uuid.uuid4().hex[:6])')"
ta="run-a-$run" tb="run-b-$run"
(run_tenant "$ta") >"$out/$scheme-$ta.out" 2>&1 &
a=$!
(run_tenant "$tb") >"$out/$scheme-$tb.out" 2>&1 &
b=$!
ra=0 rb=0
wait "$a" || ra=$?
wait "$b" || rb=$?
cat "$out/$scheme-$ta.out" "$out/$scheme-$tb.out"
rm -f "$out/$scheme-$ta.out" "$out/$scheme-$tb.out"
if [ "$ra" -ne 0 ] || [ "$rb" -ne 0 ]; then
    echo "main job on $url: tenant $ta exit $ra, tenant $tb exit $rb" >&2
    exit 1
fi
echo "main job on $url: tenants $ta and $tb side by side, each table adds up"
