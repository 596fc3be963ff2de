//! Stream entries <-> envelopes, and reading raw Redis replies.

use bytes::Bytes;
use oona_core::wire::fields;
use oona_core::{Envelope, Error, ErrorKind, Result, Topic};
use redis::Value;

/// Field holding the payload bytes.
pub(crate) const PAYLOAD: &str = "payload";

/// One stream entry as read: its id and its fields in order.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Append `XADD key [MINID ~ cutoff] * <fields> payload <bytes>` to `pipe`.
pub(crate) fn xadd(pipe: &mut redis::Pipeline, key: &str, min_id: Option<u64>, env: &Envelope) {
    // Sized up front: growing the buffer arg by arg was a visible share of
    // the publish cost.
    let headers: usize = env.headers.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut cmd = redis::Cmd::with_capacity(
        26 + 2 * env.headers.len(),
        env.payload.len() + headers + key.len() + 512,
    );
    cmd.arg("XADD").arg(key);
    if let Some(min) = min_id {
        cmd.arg("MINID").arg("~").arg(min);
    }
    cmd.arg("*");
    fields::encode_with(env, |k, v| {
        cmd.arg(k).arg(v);
    });
    cmd.arg(PAYLOAD).arg(env.payload.as_ref());
    pipe.add_command(cmd);
}

/// The envelope of an entry read from `topic`. The payload bytes are moved
/// out of the entry (no copy) and put back if the entry is no envelope, so
/// a poison dead letter still shows every field.
pub(crate) fn decode(entry: &mut Entry, topic: &Topic) -> Result<Envelope> {
    let Some(at) = entry
        .fields
        .iter()
        .position(|(k, _)| k.as_slice() == PAYLOAD.as_bytes())
    else {
        // Name the missing envelope fields first, if any.
        fields::decode(
            entry
                .fields
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice())),
            Bytes::new(),
            topic,
        )?;
        return Err(Error::new(
            ErrorKind::Decode,
            "entry has no \"payload\" field: not an Oona envelope",
        ));
    };
    let payload = Bytes::from(std::mem::take(&mut entry.fields[at].1));
    let rest = entry
        .fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != at)
        .map(|(_, (k, v))| (k.as_slice(), v.as_slice()));
    // `decode` keeps its clone only on success; on error ours is unique
    // again and turns back into the Vec without a copy.
    match fields::decode(rest, payload.clone(), topic) {
        Ok(env) => Ok(env),
        Err(e) => {
            entry.fields[at].1 = Vec::from(payload);
            Err(e)
        }
    }
}

/// The raw fields of an entry as a JSON object (for poison dead letters);
/// values that are not UTF-8 are written with replacement characters.
pub(crate) fn raw_json(entry: &Entry) -> Bytes {
    let mut map = serde_json::Map::new();
    for (k, v) in &entry.fields {
        map.insert(
            String::from_utf8_lossy(k).into_owned(),
            serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
        );
    }
    Bytes::from(serde_json::Value::Object(map).to_string())
}

fn bad(what: &str, v: &Value) -> Error {
    Error::new(
        ErrorKind::Broker,
        format!("unexpected Redis reply for {what}: {v:?}"),
    )
    .with_transport(crate::NAME)
}

pub(crate) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

pub(crate) fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(crate) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_bytes(other).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

fn into_seq(v: Value) -> std::result::Result<Vec<Value>, Value> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        other => Err(other),
    }
}

/// `[id, [f, v, f, v, ...]]`; fields `Nil` for a deleted entry (`None`).
/// Takes the reply by value so field bytes are moved, not copied.
pub(crate) fn parse_entry(v: Value) -> Result<Option<Entry>> {
    let mut parts = into_seq(v)
        .map_err(|v| bad("stream entry", &v))?
        .into_iter();
    let id = parts
        .next()
        .and_then(into_bytes)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .ok_or_else(|| bad("stream entry id", &Value::Nil))?;
    let flat = match parts.next() {
        None | Some(Value::Nil) | Some(Value::Boolean(false)) => return Ok(None),
        Some(Value::Map(m)) => {
            let mut fields = Vec::with_capacity(m.len());
            for (k, val) in m {
                let k = into_bytes(k).ok_or_else(|| bad("field name", &Value::Nil))?;
                let val = into_bytes(val).ok_or_else(|| bad("field value", &Value::Nil))?;
                fields.push((k, val));
            }
            return Ok(Some(Entry { id, fields }));
        }
        Some(f) => into_seq(f).map_err(|f| bad("entry fields", &f))?,
    };
    if flat.len() % 2 != 0 {
        return Err(bad("entry fields (odd count)", &Value::Nil));
    }
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(val)) = (it.next(), it.next()) {
        let k = into_bytes(k).ok_or_else(|| bad("field name", &Value::Nil))?;
        let val = into_bytes(val).ok_or_else(|| bad("field value", &Value::Nil))?;
        fields.push((k, val));
    }
    Ok(Some(Entry { id, fields }))
}

/// The reply of the key-ordered read script: `{entries, last}`; `last`
/// (the stream's last id) only when nothing was read.
pub(crate) fn parse_kread(v: Value) -> Result<(Vec<Entry>, Option<String>)> {
    let mut parts = into_seq(v)
        .map_err(|v| bad("key-ordered read", &v))?
        .into_iter();
    let entries = parts.next().map(into_seq).unwrap_or(Ok(Vec::new()));
    let entries = entries.map_err(|v| bad("key-ordered read entries", &v))?;
    let last = parts
        .next()
        .as_ref()
        .and_then(as_string)
        .filter(|l| !l.is_empty());
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if let Some(entry) = parse_entry(e)? {
            out.push(entry);
        }
    }
    Ok((out, last))
}

/// The entries of an XREADGROUP reply on one stream (`Nil` on timeout).
pub(crate) fn parse_xreadgroup(v: Value) -> Result<Vec<Entry>> {
    let streams: Vec<Value> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m.into_iter().map(|(_, entries)| entries).collect(),
        other => into_seq(other)
            .map_err(|o| bad("XREADGROUP", &o))?
            .into_iter()
            .map(|s| {
                into_seq(s)
                    .ok()
                    .and_then(|kv| kv.into_iter().nth(1))
                    .unwrap_or(Value::Nil)
            })
            .collect(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Ok(entries) = into_seq(entries) else {
            continue;
        };
        out.reserve(entries.len());
        for e in entries {
            if let Some(entry) = parse_entry(e)? {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

/// The reply of the claim script: `[[id, fields, count], ...]`.
/// Entries of the claim scripts: `(entry, delivery counter, recovered)`.
pub(crate) fn parse_claimed(v: Value) -> Result<Vec<(Entry, u32, bool)>> {
    let items = into_seq(v).map_err(|v| bad("claim script", &v))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut parts = into_seq(item).map_err(|i| bad("claimed entry", &i))?;
        let count = parts
            .get(2)
            .and_then(as_int)
            .ok_or_else(|| bad("claimed entry count", &Value::Nil))?;
        let recovered = parts.get(3).and_then(as_int) == Some(1);
        parts.truncate(2);
        if let Some(entry) = parse_entry(Value::Array(parts))? {
            let count = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
            out.push((entry, count, recovered));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xreadgroup_and_decodes() {
        let t = Topic::new("telemetry.seed.health").unwrap();
        let env = Envelope::builder(t.clone(), vec![0u8, 255, 7])
            .sender_id("s")
            .header("a", "b")
            .build();
        let mut flat = Vec::new();
        for (k, v) in fields::encode(&env) {
            flat.push(Value::BulkString(k.into_bytes()));
            flat.push(Value::BulkString(v.into_bytes()));
        }
        flat.push(Value::BulkString(b"payload".to_vec()));
        flat.push(Value::BulkString(env.payload.to_vec()));
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"oona:telemetry.seed.health".to_vec()),
            Value::Array(vec![Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(flat),
            ])]),
        ])]);
        let entries = parse_xreadgroup(reply).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(decode(&mut entries[0].clone(), &t).unwrap(), env);
        assert!(parse_xreadgroup(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn junk_is_a_decode_error_and_json_keeps_it() {
        let t = Topic::new("a.b").unwrap();
        let mut e = Entry {
            id: "1-0".into(),
            fields: vec![(b"foo".to_vec(), b"bar".to_vec())],
        };
        assert_eq!(decode(&mut e, &t).unwrap_err().kind(), ErrorKind::Decode);
        let mut p = Entry {
            id: "1-0".into(),
            fields: vec![(b"payload".to_vec(), b"{}".to_vec())],
        };
        assert!(decode(&mut p, &t)
            .unwrap_err()
            .to_string()
            .contains("event_id"));
        // The payload is back for the poison dead letter.
        assert_eq!(&raw_json(&p)[..], br#"{"payload":"{}"}"#);
        assert_eq!(&raw_json(&e)[..], br#"{"foo":"bar"}"#);
    }
}
