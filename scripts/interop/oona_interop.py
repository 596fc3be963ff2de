#!/usr/bin/env python3
"""Oona's wire formats written and read with the official Python clients.

Used by the Rust interop tests; see README.md beside this file. Every
subcommand prints one JSON document on stdout (logs go to stderr) and exits
non-zero on error, the document then being {"error": ..., "messages": [...]}
with what was done before the error.

    produce          N messages with every envelope field set
    produce-natural  N messages the way a Python service writes them
    produce-garbage  N (default 1) records that are no Oona envelope
    consume          N Oona messages, parsed per the wire format

A message is printed as the envelope it is (or must decode to): the flat
fields of oona-core/src/wire/fields.rs, "headers", "payload_b64", and when
read, "position" (the broker position as Oona writes it in
oona-dlq-original-position), "native" (broker metadata beside the envelope)
and, on a dead letter, "dlq" (its oona-dlq-* headers, taken out of
"headers").
"""

import argparse
import base64
import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("oona-interop")

# oona-core/src/wire/fields.rs: the flat fields, in the order encode writes them.
FIELDS = ["event_id", "sender_id", "timestamp", "topic", "trace_id",
          "correlation_id", "key", "content_type", "schema_id", "priority"]
REQUIRED = ["event_id", "sender_id", "timestamp"]
DEFAULTS = {"content_type": "application/json", "priority": "normal"}
PRIORITIES = {"low", "normal", "high", "emergency"}
HEADER_PREFIX = "h."
PAYLOAD_FIELD = "payload"          # oona-redis/src/wire.rs
REDIS_PREFIX = "oona:"             # oona-redis/src/config.rs DEFAULT_PREFIX
DLQ_PREFIX = "oona-dlq-"           # oona-core/src/envelope.rs header::DLQ_*
TOPIC_RE = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*){1,7}")

# oona-kafka/src/headers.rs: CloudEvents binary mode.
CE_FIELDS = {"ce_id": "event_id", "ce_source": "sender_id", "ce_time": "timestamp",
             "content-type": "content_type", "ce_dataschema": "schema_id",
             "ce_traceid": "trace_id", "ce_correlationid": "correlation_id",
             "ce_partitionkey": "key", "ce_priority": "priority"}
CE_HEADERS = {"traceparent": "ce_traceparent", "tracestate": "ce_tracestate"}
KAFKA_SKIP = {"ce_specversion", "ce_type", "oona-attempt", "oona-not-before"}
KAFKA_ESCAPE = "oona-h-"


class Parser(argparse.ArgumentParser):
    """Usage errors print the JSON document too (on `out`, see main)."""

    out = sys.stdout

    def error(self, message):
        self.print_usage(sys.stderr)
        print(json.dumps({"error": message, "messages": []}), file=self.out, flush=True)
        sys.exit(2)


class NotAnEnvelope(Exception):
    pass


class Failed(Exception):
    def __init__(self, msg, messages):
        super().__init__(msg)
        self.messages = messages


# ---------------------------------------------------------------- envelopes

def rfc3339_now():
    """RFC 3339 UTC with microseconds and `Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unix_millis(ts):
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def sample_payload(i):
    """A JSON object with non-ASCII text, as exact UTF-8 bytes."""
    doc = {"seq": i, "text": "Grüße, naïve café — 世界 🦀", "ok": True, "ratio": 0.25}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def full_envelope(topic, i):
    trace_id = uuid.uuid4().hex
    return {
        "event_id": str(uuid.uuid4()),
        "sender_id": "python-interop",
        "timestamp": rfc3339_now(),
        "topic": topic,
        "trace_id": trace_id,
        "correlation_id": f"corr-{uuid.uuid4().hex[:12]}",
        "key": f"key-{i % 2}",
        "content_type": "application/json",
        "schema_id": "interop.Sample/1",
        "priority": "high",
        "headers": {
            "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01",
            "x-origin": "python ✓",
            "ce_custom": "escaped on Kafka as oona-h-ce_custom",
        },
        "payload": sample_payload(i),
    }


def natural_envelope(topic, i):
    """What a minimal foreign message must decode to (documented defaults)."""
    return {
        "event_id": str(uuid.uuid4()),
        "sender_id": "python-service",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "topic": topic,
        "trace_id": None,
        "correlation_id": None,
        "key": f"seed-{i % 2}",
        "content_type": "application/json",
        "schema_id": None,
        "priority": "normal",
        "headers": {},
        "payload": sample_payload(i),
    }


def to_fields(env):
    """oona_core::wire::fields::encode: absent fields omitted, headers h.<name>."""
    out = {k: env[k] for k in FIELDS if env.get(k) is not None}
    out.update({HEADER_PREFIX + k: v for k, v in sorted(env["headers"].items())})
    return out


def from_fields(fields, payload, read_from):
    """oona_core::wire::fields::decode, with the documented defaults."""
    missing = [f for f in REQUIRED if f not in fields]
    if missing:
        raise NotAnEnvelope(f"no {missing} field: not an Oona envelope")
    env = {f: fields.get(f, DEFAULTS.get(f)) for f in FIELDS}
    env["topic"] = env["topic"] or read_from
    env["priority"] = env["priority"].lower()
    if env["priority"] not in PRIORITIES:
        raise NotAnEnvelope(f"unknown priority {env['priority']!r}")
    if not 1 <= len(env["event_id"].encode()) <= 256:
        raise NotAnEnvelope("event_id must be 1 to 256 bytes")
    env["headers"] = {k[len(HEADER_PREFIX):]: v for k, v in fields.items()
                      if k.startswith(HEADER_PREFIX)}
    env["payload"] = payload
    return env


def printable(env, **extra):
    out = {k: v for k, v in env.items() if k != "payload"}
    out["headers"] = dict(sorted(env["headers"].items()))
    dlq = {k: out["headers"].pop(k) for k in list(out["headers"]) if k.startswith(DLQ_PREFIX)}
    if dlq or env["topic"].endswith(".dlq"):
        out["dlq"] = dlq
    out["payload_b64"] = base64.b64encode(env["payload"]).decode()
    out.update(extra)
    return out


def utf8(b, what):
    try:
        return (b or b"").decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotAnEnvelope(f"{what} is not UTF-8") from e


def garbage():
    """Bytes that are neither UTF-8 nor JSON."""
    return b"\xff\xfe" + os.urandom(30)


# ---------------------------------------------------------------- URLs

def query(url):
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def hostport(url):
    return urlsplit(url).netloc.rsplit("@", 1)[-1]


# ---------------------------------------------------------------- Redis

def redis_conn(args):
    """redis://host:port[/db][?prefix=..&db=..]: the client and the stream key."""
    import redis
    u, q = urlsplit(args.url), query(args.url)
    base = u._replace(query="").geturl()
    kw = {"db": int(q["db"])} if "db" in q else {}
    return redis.Redis.from_url(base, **kw), q.get("prefix", REDIS_PREFIX) + args.topic


def redis_produce(args, envs):
    r, stream = redis_conn(args)
    for env in envs:
        r.xadd(stream, {**to_fields(env), PAYLOAD_FIELD: env["payload"]})
    log.info("XADD %d entries to %s", len(envs), stream)


def redis_produce_natural(args, envs):
    r, stream = redis_conn(args)
    for env in envs:
        r.xadd(stream, {"event_id": env["event_id"], "sender_id": env["sender_id"],
                        "timestamp": env["timestamp"], "key": env["key"],
                        "payload": env["payload"]})


def redis_produce_garbage(args, raws):
    r, stream = redis_conn(args)
    for raw in raws:
        r.xadd(stream, {PAYLOAD_FIELD: raw})


def redis_consume(args, out, deadline):
    r, stream = redis_conn(args)
    while True:
        entries = r.xrange(stream, "-", "+", count=args.count)
        if len(entries) >= args.count or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for entry_id, raw in entries:
        if PAYLOAD_FIELD.encode() not in raw:
            raise NotAnEnvelope(f"entry {entry_id!r} has no payload field")
        fields = {utf8(k, "field name"): utf8(v, k) for k, v in raw.items()
                  if k != PAYLOAD_FIELD.encode()}
        env = from_fields(fields, raw[PAYLOAD_FIELD.encode()], args.topic)
        out.append(printable(env, position=entry_id.decode(), native={"id": entry_id.decode()}))


# ---------------------------------------------------------------- Kafka

def kafka_conf(args):
    brokers = [hostport(args.url)] + [b for b in query(args.url).get("brokers", "").split(",") if b]
    return {"bootstrap.servers": ",".join(brokers)}


def kafka_headers(env):
    """oona-kafka/src/headers.rs encode."""
    h = [("ce_specversion", "1.0"), ("ce_id", env["event_id"]),
         ("ce_source", env["sender_id"]), ("ce_type", env["topic"]),
         ("ce_time", env["timestamp"]), ("content-type", env["content_type"])]
    for name, field in [("ce_dataschema", "schema_id"), ("ce_traceid", "trace_id"),
                        ("ce_correlationid", "correlation_id"), ("ce_partitionkey", "key")]:
        if env[field] is not None:
            h.append((name, env[field]))
    if env["priority"] != "normal":
        h.append(("ce_priority", env["priority"]))
    for k, v in sorted(env["headers"].items()):
        if k in CE_HEADERS:
            k = CE_HEADERS[k]
        elif k.startswith("ce_") or k == "content-type" or k.startswith(KAFKA_ESCAPE):
            k = KAFKA_ESCAPE + k
        h.append((k, v.encode("utf-8")))
    return [(k, v if isinstance(v, bytes) else v.encode("utf-8")) for k, v in h]


def kafka_send(args, records, conf=None):
    """records: (key, value, headers); waits for every delivery report."""
    from confluent_kafka import Producer
    p = Producer({**kafka_conf(args), **(conf or {})})
    errors = []
    for key, value, headers in records:
        p.produce(args.topic, value=value, key=key, headers=headers,
                  on_delivery=lambda err, _msg: err and errors.append(err))
    left = p.flush(30)
    if errors or left:
        raise RuntimeError(f"kafka: {left} undelivered, errors {errors}")
    log.info("produced %d records to %s", len(records), args.topic)


def kafka_produce(args, envs):
    kafka_send(args, [(e["key"], e["payload"], kafka_headers(e)) for e in envs],
               {"acks": "all", "enable.idempotence": True})


def kafka_produce_natural(args, envs):
    kafka_send(args, [(e["key"], e["payload"], [
        ("ce_specversion", "1.0"), ("ce_id", e["event_id"]), ("ce_source", e["sender_id"]),
        ("ce_type", "interop.sample"), ("ce_time", e["timestamp"])]) for e in envs])


def kafka_produce_garbage(args, raws):
    kafka_send(args, [(None, raw, None) for raw in raws])


def kafka_decode(msg):
    """oona-kafka/src/headers.rs decode; the topic is the record's."""
    fields = {}
    for k, v in msg.headers() or []:
        v = utf8(v, f"header {k}")
        if k in KAFKA_SKIP:
            continue
        if k in CE_FIELDS:
            fields[CE_FIELDS[k]] = v
        elif k in ("ce_traceparent", "ce_tracestate"):
            fields[HEADER_PREFIX + k[3:]] = v
        else:
            fields[HEADER_PREFIX + k.removeprefix(KAFKA_ESCAPE)] = v
    env = from_fields(fields, msg.value() or b"", msg.topic())
    record_key = None if msg.key() is None else utf8(msg.key(), "record key")
    if env["key"] is None:
        env["key"] = record_key  # README: key = ce_partitionkey (and the record key)
    return env, record_key


def kafka_consume(args, out, deadline):
    from confluent_kafka import Consumer, KafkaError
    c = Consumer({**kafka_conf(args), "group.id": args.group or f"oona-interop-{uuid.uuid4().hex[:12]}",
                  "auto.offset.reset": "earliest"})
    c.subscribe([args.topic])
    try:
        while len(out) < args.count and time.monotonic() < deadline:
            msg = c.poll(min(1.0, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._PARTITION_EOF):
                    continue
                raise RuntimeError(f"kafka: {msg.error()}")
            env, record_key = kafka_decode(msg)
            ts_type, ts = msg.timestamp()
            out.append(printable(env, position=f"{msg.partition()}/{msg.offset()}", native={
                "partition": msg.partition(), "offset": msg.offset(), "record_key": record_key,
                "timestamp_ms": ts, "header_names": [k for k, _ in msg.headers() or []]}))
    finally:
        c.close()


# ---------------------------------------------------------------- Pulsar

def pulsar_client(args):
    """pulsar://host:port?tenant=..&namespace=..: the client and the full topic name."""
    import pulsar
    q = query(args.url)
    tenant = args.tenant or q.get("tenant", "public")
    namespace = args.namespace or q.get("namespace", "default")
    # A Python logger here makes the client abort now and then at exit
    # ("terminate called without an active exception"); its console logger
    # writes to fd 1, which main() points at stderr.
    client = pulsar.Client(urlsplit(args.url)._replace(query="").geturl(),
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    return client, f"persistent://{tenant}/{namespace}/{args.topic}"


def pulsar_send(args, messages, batching):
    """messages: (payload, kwargs of send); batching: send_async all, then flush."""
    import pulsar
    client, topic = pulsar_client(args)
    try:
        producer = client.create_producer(topic, batching_enabled=batching)
        if batching:
            results = []
            for payload, kw in messages:
                producer.send_async(payload, lambda res, _id: results.append(res), **kw)
            producer.flush()
            bad = [r for r in results if r != pulsar.Result.Ok]
            if bad or len(results) != len(messages):
                raise RuntimeError(f"pulsar: {len(results)} of {len(messages)} acknowledged, {bad}")
        else:
            for payload, kw in messages:
                producer.send(payload, **kw)
        producer.close()
        log.info("produced %d messages to %s", len(messages), topic)
    finally:
        client.close()


def pulsar_produce(args, envs):
    pulsar_send(args, [(e["payload"], {"properties": to_fields(e), "partition_key": e["key"],
                                       "event_timestamp": unix_millis(e["timestamp"])})
                       for e in envs], batching=False)


def pulsar_produce_natural(args, envs):
    pulsar_send(args, [(e["payload"], {
        "properties": {"event_id": e["event_id"], "sender_id": e["sender_id"],
                       "timestamp": e["timestamp"]},
        "partition_key": e["key"]}) for e in envs], batching=True)


def pulsar_produce_garbage(args, raws):
    pulsar_send(args, [(raw, {}) for raw in raws], batching=False)


def pulsar_consume(args, out, deadline):
    import pulsar
    client, topic = pulsar_client(args)
    try:
        c = client.subscribe(topic, args.group or f"oona-interop-{uuid.uuid4().hex[:12]}",
                             consumer_type=pulsar.ConsumerType.Shared,
                             initial_position=pulsar.InitialPosition.Earliest)
        while len(out) < args.count:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            try:
                msg = c.receive(timeout_millis=left)
            except pulsar.Timeout:
                break
            env = from_fields(msg.properties(), msg.data(), args.topic)
            if env["key"] is None:  # mapping.rs: a Pulsar key alone is the key
                env["key"] = msg.partition_key() or None
            mid = msg.message_id()
            pos = f"{mid.ledger_id()}:{mid.entry_id()}"
            if mid.batch_index() >= 0:
                pos += f":{mid.batch_index()}"
            out.append(printable(env, position=pos, native={
                "partition_key": msg.partition_key() or None,
                "event_timestamp": msg.event_timestamp() or None,
                "publish_timestamp": msg.publish_timestamp(),
                "redelivery_count": msg.redelivery_count()}))
            c.acknowledge(msg)
        c.close()
    finally:
        client.close()


# ---------------------------------------------------------------- commands

BROKERS = {
    "redis": (redis_produce, redis_produce_natural, redis_produce_garbage, redis_consume),
    "kafka": (kafka_produce, kafka_produce_natural, kafka_produce_garbage, kafka_consume),
    "pulsar": (pulsar_produce, pulsar_produce_natural, pulsar_produce_garbage, pulsar_consume),
}


def run(args):
    produce, natural, junk, consume = BROKERS[args.broker]
    if args.cmd == "produce":
        envs = [full_envelope(args.topic, i) for i in range(args.count)]
        produce(args, envs)
        return [printable(e) for e in envs]
    if args.cmd == "produce-natural":
        envs = [natural_envelope(args.topic, i) for i in range(args.count)]
        natural(args, envs)
        return [printable(e) for e in envs]
    if args.cmd == "produce-garbage":
        raws = [garbage() for _ in range(args.count)]
        junk(args, raws)
        return [{"raw_b64": base64.b64encode(r).decode()} for r in raws]
    out = []
    try:
        consume(args, out, time.monotonic() + args.timeout)
    except Exception as e:
        raise Failed(str(e), out) from e
    log.info("read %d messages of %s", len(out), args.topic)
    if len(out) < args.count:
        raise Failed(f"got {len(out)} of {args.count} messages within {args.timeout}s", out)
    return out


def parse_args(argv, out):
    Parser.out = out
    ap = Parser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("produce", "produce-natural", "produce-garbage", "consume"):
        p = sub.add_parser(cmd)
        p.add_argument("--broker", required=True, choices=sorted(BROKERS))
        p.add_argument("--url", required=True)
        p.add_argument("--topic", required=True)
        p.add_argument("--count", type=int, default=1 if cmd == "produce-garbage" else None,
                       required=cmd != "produce-garbage")
        p.add_argument("--tenant")
        p.add_argument("--namespace")
        if cmd == "consume":
            p.add_argument("--timeout", type=float, default=30.0)
            p.add_argument("--group")
    args = ap.parse_args(argv)
    if not (TOPIC_RE.fullmatch(args.topic) and len(args.topic) <= 200):
        ap.error(f"--topic {args.topic!r} is not an Oona topic name")
    return args


def main(argv=None):
    # The JSON goes to the real stdout; fd 1 becomes stderr, so whatever the
    # native clients print (pulsar-client logs to stdout) lands in the logs.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv, out)
    try:
        doc, code = {"messages": run(args)}, 0
    except Exception as e:  # one JSON document on stdout, whatever happened
        cause = e.__cause__ or e
        log.error("%s %s: %s", args.cmd, args.broker, e, exc_info=not isinstance(cause, (Failed, NotAnEnvelope)))
        doc, code = {"error": str(e), "messages": getattr(e, "messages", [])}, 1
    json.dump(doc, out, ensure_ascii=False, indent=1)
    out.write("\n")
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
