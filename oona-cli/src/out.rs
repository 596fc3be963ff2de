//! Output: tables and envelopes for people (colour only on a terminal),
//! JSON for scripts.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use oona::{DeliveryInfo, Envelope};
use serde_json::Value;

/// Set once stdout is gone (a closed pipe: `oona tail --json | head`):
/// nothing more is printed, and readers stop and clean up.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Write one line to stdout; a failed write (a closed pipe) marks stdout
/// gone instead of panicking as `println!` does.
pub fn write_line(line: std::fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        STDOUT_GONE.store(true, Ordering::Relaxed);
    }
}

/// Whether stdout is gone (see [`write_line`]).
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

/// `println!` through [`write_line`].
macro_rules! say {
    () => { $crate::out::write_line(format_args!("")) };
    ($($t:tt)*) => { $crate::out::write_line(format_args!($($t)*)) };
}
pub(crate) use say;

/// When to colour output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless `NO_COLOR` is set or `TERM=dumb`.
    Auto,
    Always,
    Never,
}

/// How to print.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
    color: bool,
}

const BOLD: &str = "1";
const DIM: &str = "2";
const CYAN: &str = "36";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";

impl Out {
    pub fn new(json: bool, color: ColorChoice) -> Self {
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var("TERM").map_or(true, |t| t != "dumb")
            }
        };
        Out { json, color }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn bold(&self, s: &str) -> String {
        self.paint(BOLD, s)
    }
    pub fn dim(&self, s: &str) -> String {
        self.paint(DIM, s)
    }
    pub fn good(&self, s: &str) -> String {
        self.paint(GREEN, s)
    }
    pub fn warn(&self, s: &str) -> String {
        self.paint(YELLOW, s)
    }
    pub fn bad(&self, s: &str) -> String {
        self.paint(RED, s)
    }

    /// One JSON document on its own line.
    pub fn json_line(&self, v: &Value) {
        say!("{v}");
    }

    /// A table: a bold header row, columns padded to their widest cell.
    pub fn table(&self, header: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            let n = cells.len();
            let mut s = String::new();
            for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
                let pad = w.saturating_sub(c.chars().count());
                s.push_str(&c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(pad + 2));
                }
            }
            s
        };
        let head = line(header.iter().map(|h| h.to_string()).collect());
        say!("{}", self.bold(&head));
        for r in rows {
            say!("{}", line(r.clone()));
        }
    }

    /// An envelope as people read it: a header line, its headers, and the
    /// payload (JSON compact, text as is, other bytes in base64).
    pub fn envelope(&self, env: &Envelope, info: Option<&DeliveryInfo>) {
        let mut head = format!(
            "{} {} {}",
            self.dim(&env.timestamp.to_string()),
            self.paint(CYAN, env.topic.as_str()),
            self.dim(&env.event_id.to_string()),
        );
        if let Some(k) = &env.key {
            head.push_str(&format!(" key={}", self.bold(k)));
        }
        if let Some(i) = info {
            if let Some(p) = &i.position {
                head.push_str(&format!(" @{p}"));
            }
            if i.attempt > 1 {
                head.push_str(&self.warn(&format!(" attempt {}", i.attempt)));
            }
        }
        if env.priority != oona::Priority::Normal {
            head.push_str(&format!(" priority={}", env.priority));
        }
        say!("{head}");
        let mut meta: Vec<String> = Vec::new();
        if let Some(s) = &env.schema_id {
            meta.push(format!("schema={s}"));
        }
        meta.push(format!("content-type={}", env.content_type.as_str()));
        meta.push(format!("sender={}", env.sender_id));
        if let Some(c) = &env.correlation_id {
            meta.push(format!("correlation={c}"));
        }
        meta.extend(env.headers.iter().map(|(k, v)| format!("{k}={v}")));
        say!("  {}", self.dim(&meta.join(" ")));
        say!("  {}", payload_text(env));
    }
}

/// The payload as one line: JSON compact, UTF-8 text as is, other bytes as
/// `base64:<...>`.
pub fn payload_text(env: &Envelope) -> String {
    let bytes = &env.payload;
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return v.to_string();
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            s.replace('\n', "\\n")
        }
        _ => format!(
            "base64:{} ({} bytes)",
            base64::engine::general_purpose::STANDARD.encode(bytes),
            bytes.len()
        ),
    }
}

/// The canonical JSON form of an envelope (`oona_core::wire::json`, its
/// payload byte for byte), with the delivery's position and attempt beside
/// it when known.
pub fn envelope_json(env: &Envelope, info: Option<&DeliveryInfo>) -> oona::Result<String> {
    let doc = oona::wire::json::encode(env)?;
    let text = String::from_utf8(doc).map_err(|e| {
        oona::Error::new(
            oona::ErrorKind::Encode,
            format!("the JSON form is not UTF-8: {e}"),
        )
    })?;
    let Some(i) = info else { return Ok(text) };
    // The document is one object: its delivery goes before the last brace.
    let body = text.trim_end().strip_suffix('}').ok_or_else(|| {
        oona::Error::new(oona::ErrorKind::Encode, "the JSON form is not an object")
    })?;
    let delivery = serde_json::json!({"position": i.position, "attempt": i.attempt});
    Ok(format!("{body},\"delivery\":{delivery}}}"))
}

/// A retention as people read it (`72h`, `30d`, `forever`).
pub fn retention_text(r: Option<oona::Retention>) -> String {
    match r {
        None => "-".into(),
        Some(oona::Retention::Indefinite) => "forever".into(),
        Some(oona::Retention::For(d)) => duration_text(d),
    }
}

pub fn duration_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn payloads_print_on_one_line() {
        let t = oona::Topic::new("a.b.c").unwrap();
        let json = Envelope::builder(t.clone(), " {\"a\": 1}\n").build();
        assert_eq!(payload_text(&json), "{\"a\":1}");
        let text = Envelope::builder(t.clone(), "two\nlines").build();
        assert_eq!(payload_text(&text), "two\\nlines");
        let bin = Envelope::builder(t, vec![0u8, 159, 146, 150]).build();
        assert_eq!(payload_text(&bin), "base64:AJ+Slg== (4 bytes)");
    }

    #[test]
    fn the_json_form_keeps_the_payload_bytes() {
        let t = oona::Topic::new("a.b.c").unwrap();
        let env = Envelope::builder(t, r#"{"z":1.10,"a":1e2}"#).build();
        let sub = oona::Subscription::new(env.topic.clone(), oona::Name::new("g").unwrap());
        let info = DeliveryInfo::new(&sub, 2, Some("5-0".into()));
        let text = envelope_json(&env, Some(&info)).unwrap();
        assert!(text.contains(r#""payload":{"z":1.10,"a":1e2}"#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["delivery"]["position"], "5-0");
        assert_eq!(v["delivery"]["attempt"], 2);
        let back = oona::wire::json::decode(text.as_bytes()).unwrap();
        assert_eq!(back, env, "the extra key does not change the envelope");
    }

    #[test]
    fn retentions_read_as_people_write_them() {
        assert_eq!(retention_text(Some(oona::Retention::Indefinite)), "forever");
        let h72 = oona::Retention::For(Duration::from_secs(72 * 3600));
        assert_eq!(retention_text(Some(h72)), "3d");
        assert_eq!(duration_text(Duration::from_secs(5400)), "90m");
        assert_eq!(retention_text(None), "-");
    }
}
