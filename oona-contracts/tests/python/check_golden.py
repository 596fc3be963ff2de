"""Interop check: Python's fastavro and protobuf read the golden files.

Not part of CI (it needs Python packages); run it by hand after a format
change:

    python3 -m venv /tmp/pyenv && /tmp/pyenv/bin/pip install fastavro protobuf
    cargo run -q -p oona-contracts --example descriptor_set -- /tmp/oona.binpb
    cd oona-contracts/tests/golden && /tmp/pyenv/bin/python ../python/check_golden.py /tmp/oona.binpb

For every contract it checks that fastavro decodes the Avro sample (after the
10-byte single-object header, whose fingerprint must equal fastavro's) to the
JSON sample and writes the same bytes, and that protobuf decodes the protobuf
sample to the same values and re-serializes it byte for byte; then the same
for the protobuf envelope against the canonical JSON envelope.
"""
import glob, io, json, sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


def check_avro():
    n = 0
    for avsc in sorted(glob.glob("avro/*.avsc")):
        name = avsc[len("avro/"):-len(".avsc")]
        schema = fastavro.parse_schema(json.load(open(avsc)))
        data = open(f"avro/{name}.avro", "rb").read()
        assert data[:2] == b"\xc3\x01", name
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        assert data[2:10] == fp, (name, data[2:10].hex(), fp.hex())
        record = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema)
        want = json.load(open(f"json/{name}.json"))
        assert record == want, (name, record, want)
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, want)
        assert data[10:] == out.getvalue(), name
        n += 1
    return n


def norm(v):
    # proto3 JSON writes 64-bit integers as strings and omits unset optionals.
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    return v


def check_protobuf(fds_path):
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(fds_path, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    n = 0
    for path in sorted(glob.glob("protobuf/*.binpb")):
        name = path[len("protobuf/"):-len(".binpb")]
        raw = open(path, "rb").read()
        m = message_factory.GetMessageClass(pool.FindMessageTypeByName(name)).FromString(raw)
        d = json_format.MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        assert norm(d) == norm(json.load(open(f"json/{name}.json"))), name
        assert m.SerializeToString(deterministic=True) == raw, name
        n += 1
    raw = open("envelope/envelope.binpb", "rb").read()
    e = message_factory.GetMessageClass(pool.FindMessageTypeByName("oona.v1.Envelope")).FromString(raw)
    doc = json.load(open("envelope/envelope.json"))
    meta = doc["envelope"]
    assert (e.event_id, e.sender_id, e.topic, e.key) == (
        meta["event_id"], meta["sender_id"], meta["topic"], meta["key"])
    assert e.timestamp.ToJsonString() == meta["timestamp"]
    assert dict(e.headers) == meta["headers"]
    assert json.loads(e.payload) == doc["payload"]
    assert e.SerializeToString(deterministic=True) == raw
    return n


if __name__ == "__main__":
    print(f"avro: {check_avro()} contracts ok")
    print(f"protobuf: {check_protobuf(sys.argv[1])} contracts + envelope ok")
