#!/usr/bin/env bash
# The test command (README.md; `.ci/run` calls exactly this).
#
#   bash scripts/test.sh
#
# 1. formatting and lints: cargo fmt --check, cargo clippy -D warnings
#    (a loud warning instead where the toolchain lacks the component);
# 2. starts the real brokers with scripts/brokers.sh (installing what a fresh
#    machine lacks) unless their OONA_TEST_*_URL are already set, and stops
#    the ones it started on exit;
# 3. the Python venv with the official clients (scripts/python-venv.sh);
# 4. installs the operator CLI (`cargo install --path oona-cli`), whose
#    end-to-end tests run that binary;
# 5. every test of the workspace with every feature: the conformance suite
#    against memory:// and each broker, the Python interop tests, with
#    OONA_TEST_REQUIRE=1 so a missing broker fails the run instead of being
#    skipped;
# 6. the main job, `esper_pipeline`, on memory://, Redis, Kafka and Pulsar,
#    its /metrics, /healthz and /readyz scraped while it runs.
#
# OONA_TEST_BROKERS overrides the broker list (default: every supported one,
# and s3, the S3-compatible server of the claim-check tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OONA_TEST_REQUIRE="${OONA_TEST_REQUIRE:-1}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

step() { printf '\n==> %s\n' "$*" >&2; }

# Toolchain components a minimal rustup install may lack. The toolchain
# cannot always be fetched here: without them the run warns loudly and goes
# on; where they exist, fmt and clippy are required.
HAVE_FMT=1
HAVE_CLIPPY=1
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    step "installing rustfmt and clippy"
    rustup component add rustfmt clippy || true
    cargo fmt --version >/dev/null 2>&1 || HAVE_FMT=0
    cargo clippy --version >/dev/null 2>&1 || HAVE_CLIPPY=0
fi
warn_missing() {
    printf '\n!!! WARNING: the Rust toolchain has no %s component and rustup could not add it:\n!!! %s is NOT checked in this run.\n\n' "$1" "$2" >&2
}

# System packages the build needs: protoc for the pulsar crate's build
# script (oona-contracts uses the pure-Rust protox and needs none);
# make, pkg-config and OpenSSL headers for the bundled librdkafka build.
need_pkgs=()
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need_pkgs+=(libssl-dev)
# The openssl tool makes the CA and certificates of the TLS tests.
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    step "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}"
fi

if [ "$HAVE_FMT" = 1 ]; then
    step "cargo fmt --check"
    cargo fmt --all --check
else
    warn_missing rustfmt "formatting"
fi

if [ "$HAVE_CLIPPY" = 1 ]; then
    step "cargo clippy"
    cargo clippy --workspace --all-targets --all-features -- -D warnings
else
    warn_missing clippy "linting"
fi

BROKERS="${OONA_TEST_BROKERS:-redis redis8 kafka pulsar s3}"
step "brokers: $BROKERS"
STARTED=()
cleanup() {
    if [ "${#STARTED[@]}" -gt 0 ]; then
        bash scripts/brokers.sh down "${STARTED[@]}" || true
    fi
}
trap cleanup EXIT
for b in $BROKERS; do
    var="OONA_TEST_$(echo "$b" | tr '[:lower:]' '[:upper:]')_URL"
    if [ -n "${!var:-}" ]; then
        echo "using $var=${!var}" >&2
        continue
    fi
    # Listed first: a broker that fails half-way is stopped on exit too.
    STARTED+=("$b")
    bash scripts/brokers.sh up "$b"
done
if [ -f "$TARGET/brokers.env" ]; then
    set -a
    # shellcheck disable=SC1091
    . "$TARGET/brokers.env"
    set +a
fi

# The official Python clients for the interop tests (oona/tests/interop.rs).
if [ -z "${OONA_TEST_PYTHON:-}" ]; then
    step "python venv (redis-py, confluent-kafka, pulsar-client)"
    OONA_TEST_PYTHON="$(bash scripts/python-venv.sh | tail -n 1)"
    export OONA_TEST_PYTHON
fi

# The operator CLI as users install it; its end-to-end tests
# (oona-cli/tests/e2e.rs) run this binary against each broker.
step "cargo install --path oona-cli"
CLI_ROOT="$TARGET/cli"
cargo install --path oona-cli --root "$CLI_ROOT" --debug --locked --force --quiet
export OONA_CLI_BIN="$CLI_ROOT/bin/oona"
"$OONA_CLI_BIN" --version

step "cargo test (workspace, all features)"
cargo test --workspace --all-features

# The main job serves /metrics, /healthz and /readyz while it runs
# (OONA_METRICS_ADDR); scripts/main-job.sh scrapes and checks them.
step "main job on memory://"
bash scripts/main-job.sh memory://
for var in OONA_TEST_REDIS_URL OONA_TEST_KAFKA_URL OONA_TEST_PULSAR_URL; do
    if [ -n "${!var:-}" ]; then
        step "main job on ${!var}"
        bash scripts/main-job.sh "${!var}"
    fi
done
step "all tests passed"
