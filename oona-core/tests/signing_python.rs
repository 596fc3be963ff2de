//! The Python signer of the crate docs (README, standard library only)
//! against this crate: what one signs the other verifies, byte for byte.
//! Runs `OONA_TEST_PYTHON` (the venv of `scripts/python-venv.sh`), else
//! `python3`.

use std::process::Command;

use base64::Engine as _;
use oona_core::security::{sign, verify, Keyring, SignatureError, SIGNATURE_HEADER};
use oona_core::{Envelope, Timestamp, Topic};
use serde_json::{json, Value};

const SECRET_B64: &str = "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXMh";

/// The ```python block of the README.
fn snippet() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```python\n")
        .expect("a python block in the README")
        + 10;
    let len = readme[start..]
        .find("```")
        .expect("the end of the python block");
    readme[start..start + len].to_string()
}

/// Run the snippet, then `driver` with `case` (JSON) in `CASE`; the JSON it
/// prints.
fn python(driver: &str, case: &Value) -> Value {
    let python = std::env::var("OONA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let program = format!(
        "{}\nimport base64, json, os\nCASE = json.loads(os.environ['CASE'])\n{driver}",
        snippet()
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(program)
        .env("CASE", case.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn envelope() -> Envelope {
    Envelope::builder(
        Topic::new("control.kasmina.commands").unwrap(),
        &b"{\"op\":\"prune\",\"layer\":3}"[..],
    )
    .sender_id("tamiyo-controller-1")
    .timestamp(Timestamp::from_unix_millis(1_767_225_600_123))
    .key("layer-3")
    .correlation_id("req-7")
    .header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .header("x-empty", "")
    .header("zz", "last, with: punctuation")
    .build()
}

/// The envelope as a Python service reads it from the wire.
fn wire(e: &Envelope) -> Value {
    let mut env = serde_json::Map::new();
    let mut headers = serde_json::Map::new();
    for (k, v) in oona_core::wire::fields::encode(e) {
        match k.strip_prefix("h.") {
            Some(h) => headers.insert(h.to_string(), json!(v)),
            None => env.insert(k, json!(v)),
        };
    }
    json!({
        "env": env,
        "headers": headers,
        "payload": base64::engine::general_purpose::STANDARD.encode(&e.payload),
        "secret": SECRET_B64,
    })
}

fn keyring() -> Keyring {
    Keyring::parse(&format!("py1:{SECRET_B64}")).unwrap()
}

#[test]
fn python_signs_what_oona_verifies_and_back() {
    let ring = keyring();
    // Python signs an envelope Oona built; Oona verifies it.
    let mut e = envelope();
    let py = python(
        "print(json.dumps({'sig': sign(CASE['env'], CASE['headers'], base64.b64decode(CASE['payload']), 'py1', base64.b64decode(CASE['secret']))}))",
        &wire(&e),
    );
    let py_sig = py["sig"].as_str().unwrap().to_string();
    e.headers.insert(SIGNATURE_HEADER.into(), py_sig.clone());
    assert_eq!(verify(&e, &ring).unwrap().as_str(), "py1");
    // Oona's own signature is the same string.
    let mut ours = e.clone();
    ours.headers.remove(SIGNATURE_HEADER);
    sign(&mut ours, &ring);
    assert_eq!(ours.headers[SIGNATURE_HEADER], py_sig);

    // Oona signs; Python verifies, and refuses a changed payload.
    let mut case = wire(&ours);
    let verdict = python(
        "keys = {'py1': base64.b64decode(CASE['secret'])}\n\
         payload = base64.b64decode(CASE['payload'])\n\
         ok = verify(CASE['env'], CASE['headers'], payload, keys)\n\
         try:\n    verify(CASE['env'], CASE['headers'], payload + b' ', keys)\n    bad = 'accepted'\n\
         except ValueError as e:\n    bad = str(e)\n\
         print(json.dumps({'ok': ok, 'bad': bad}))",
        &case,
    );
    assert_eq!(verdict["ok"], "py1");
    assert_eq!(verdict["bad"], "signature: does not match (key py1)");

    // A timestamp written another way by the Python side signs alike.
    case["env"]["timestamp"] = json!("2026-01-01T00:00:00.123000+00:00");
    let alt = python(
        "print(json.dumps({'sig': sign(CASE['env'], CASE['headers'], base64.b64decode(CASE['payload']), 'py1', base64.b64decode(CASE['secret']))}))",
        &case,
    );
    assert_eq!(alt["sig"], json!(py_sig));
}

#[test]
fn a_tampered_python_message_is_refused() {
    let ring = keyring();
    let mut e = envelope();
    let py = python(
        "print(json.dumps({'sig': sign(CASE['env'], CASE['headers'], base64.b64decode(CASE['payload']), 'py1', base64.b64decode(CASE['secret']))}))",
        &wire(&e),
    );
    e.headers
        .insert(SIGNATURE_HEADER.into(), py["sig"].as_str().unwrap().into());
    e.headers.insert("zz".into(), "changed".into());
    assert!(matches!(
        verify(&e, &ring),
        Err(SignatureError::Mismatch(_))
    ));
}
