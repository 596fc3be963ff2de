#!/usr/bin/env bash
# The Python venv of the interop tests, with the official clients pinned in
# scripts/interop/requirements.txt (redis-py, confluent-kafka, pulsar-client).
#
#   PY="$(bash scripts/python-venv.sh | tail -n 1)"
#   "$PY" scripts/interop/oona_interop.py --help
#
# Creates the venv at ${OONA_VENV:-$HOME/.cache/oona/venv} with
# `python3 -m venv` and installs the pins; reuses it as it is when its marker
# file holds the same requirement list (no pip call: fast when warm). Logs go
# to stderr; the last line on stdout is the venv's python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/scripts/interop/requirements.txt"
VENV="${OONA_VENV:-$HOME/.cache/oona/venv}"
PY="$VENV/bin/python"
MARKER="$VENV/.oona-requirements"

log() { printf 'python-venv: %s\n' "$*" >&2; }

if [ -x "$PY" ] && "$PY" -c '' 2>/dev/null && cmp -s "$REQ" "$MARKER"; then
    log "reusing $VENV"
    echo "$PY"
    exit 0
fi

# A venv whose interpreter no longer runs (the system python changed) is
# made anew; only a directory that is a venv is ever removed.
if [ -e "$VENV" ] && ! { [ -x "$PY" ] && "$PY" -c '' 2>/dev/null; }; then
    [ -f "$VENV/pyvenv.cfg" ] || { log "$VENV exists and is not a venv; not touching it"; exit 1; }
    log "removing broken venv $VENV"
    rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
    log "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" >&2; then
        # Debian's python3 keeps venv (and its pip) in a package of its own.
        log "python3 -m venv failed; installing python3-venv (Debian)"
        rm -rf "$VENV"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq python3-venv >&2
        python3 -m venv "$VENV" >&2
    fi
fi

log "installing $(grep -v -e '^#' -e '^$' "$REQ" | tr '\n' ' ')"
rm -f "$MARKER"
"$PY" -m pip install --disable-pip-version-check --no-input -q -r "$REQ" >&2
"$PY" -c 'import redis, confluent_kafka, pulsar' >&2
cp "$REQ" "$MARKER"
log "ready: $VENV"
echo "$PY"
