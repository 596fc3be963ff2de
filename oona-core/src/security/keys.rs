//! Signing keys: secrets that never print, keyrings that rotate, keys by
//! plane, loaded from the environment or files.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;

use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Name, Topic};

/// The id of a key, travelling with each signature: a [`Name`] (1 to 64
/// of `A-Z a-z 0-9 . _ -` here).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Name);

impl KeyId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = 64;

    /// Check `id` against the grammar.
    pub fn new(id: impl AsRef<str>) -> Result<Self> {
        let id = id.as_ref();
        let bad = |why: String| Error::new(ErrorKind::ConfigInvalid, format!("key id: {why}"));
        if id.len() > Self::MAX_LEN {
            return Err(bad(format!(
                "{id:?} is longer than {} bytes",
                Self::MAX_LEN
            )));
        }
        Name::new(id)
            .map(KeyId)
            .map_err(|e| bad(e.message().to_string()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

/// Secret bytes. `Debug` and `Display` print `[redacted]`; the bytes are
/// reachable only through [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(Arc<Inner>);

struct Inner {
    bytes: Vec<u8>,
    /// HMAC-SHA256 keyed with the bytes, cloned for each message (keying
    /// hashes two blocks).
    keyed: HmacSha256,
}

pub(crate) type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Shortest secret accepted: HMAC-SHA256 keys should be at least as long
/// as its output.
pub const MIN_SECRET_BYTES: usize = 32;

impl Secret {
    /// A secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "a signing secret must have at least {MIN_SECRET_BYTES} bytes, this one has {}",
                    bytes.len()
                ),
            ));
        }
        use hmac::Mac as _;
        let keyed = match HmacSha256::new_from_slice(&bytes) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes a key of any length"),
        };
        Ok(Secret(Arc::new(Inner { bytes, keyed })))
    }

    /// A secret written in standard base64 (padding optional).
    pub fn from_base64(text: &str) -> Result<Self> {
        let text = text.trim();
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let bytes = engine.decode(text).map_err(|e| {
            // The error names a position, never the text.
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("a signing secret is not standard base64: {e}"),
            )
        })?;
        Secret::new(bytes)
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0.bytes
    }

    /// A MAC keyed with the secret, ready for a message.
    pub(crate) fn mac(&self) -> HmacSha256 {
        self.0.keyed.clone()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Keys of one scope: the current one signs, every listed one verifies, so
/// a key rotates without downtime (list the new key on the consumers, then
/// make it current on the publishers, then drop the old one).
#[derive(Clone)]
pub struct Keyring {
    /// The current key first.
    keys: Vec<(KeyId, Secret)>,
}

impl Keyring {
    /// A keyring that signs with `secret` under `id`.
    pub fn new(id: KeyId, secret: Secret) -> Self {
        Keyring {
            keys: vec![(id, secret)],
        }
    }

    /// Also verify with `secret` under `id` (an older key, or the next
    /// one); a listed id gets the new secret and keeps its place.
    pub fn with_key(mut self, id: KeyId, secret: Secret) -> Self {
        match self.keys.iter_mut().find(|(k, _)| *k == id) {
            Some(entry) => entry.1 = secret,
            None => self.keys.push((id, secret)),
        }
        self
    }

    /// Parse `id:base64-secret` items separated by commas or new lines, the
    /// current key first. Blank lines and lines starting with `#` are
    /// skipped (for files).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut keys: Vec<(KeyId, Secret)> = Vec::new();
        let items = spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with('#'));
        for (n, item) in items.enumerate() {
            let Some((id, secret)) = item.split_once(':') else {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("signing key {}: expected `id:base64-secret`", n + 1),
                ));
            };
            let id = KeyId::new(id.trim())?;
            let secret = Secret::from_base64(secret)
                .map_err(|e| Error::new(ErrorKind::ConfigInvalid, format!("key {id}: {e}")))?;
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("signing key {id} is listed twice"),
                ));
            }
            keys.push((id, secret));
        }
        if keys.is_empty() {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "a keyring needs at least one `id:base64-secret`",
            ));
        }
        Ok(Keyring { keys })
    }

    /// Read a keyring file ([`Keyring::parse`]'s format).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("signing keys file {}: {e}", path.display()),
            )
        })?;
        Keyring::parse(&text)
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
    }

    /// The key that signs.
    pub fn current(&self) -> (&KeyId, &Secret) {
        let (id, s) = &self.keys[0];
        (id, s)
    }

    /// The key listed under `id`.
    pub fn get(&self, id: &str) -> Option<&Secret> {
        self.keys
            .iter()
            .find(|(k, _)| k.as_str() == id)
            .map(|(_, s)| s)
    }

    /// The ids listed, the current first.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(k, _)| k)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", self.current().0)
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

/// Keyrings by plane: a plane's own (command topics signed with a key only
/// the controller holds), else the default one; a topic with neither is
/// neither signed nor checked.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    default: Option<Keyring>,
    planes: HashMap<String, Keyring>,
}

/// The environment variable of the default keyring ([`Keys::from_env`]).
pub const KEYS_ENV: &str = "OONA_SIGNING_KEYS";

impl Keys {
    /// No keys.
    pub fn new() -> Self {
        Keys::default()
    }

    /// Use `keyring` for every plane without its own.
    pub fn with_default(mut self, keyring: Keyring) -> Self {
        self.default = Some(keyring);
        self
    }

    /// Use `keyring` for the topics of `plane`.
    pub fn with_plane(mut self, plane: impl Into<String>, keyring: Keyring) -> Self {
        self.planes.insert(plane.into(), keyring);
        self
    }

    /// The keyring of `topic`.
    pub fn for_topic(&self, topic: &Topic) -> Option<&Keyring> {
        self.planes.get(topic.plane()).or(self.default.as_ref())
    }

    /// Whether no keyring is set.
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.planes.is_empty()
    }

    /// Keys from the environment: `OONA_SIGNING_KEYS` (the default keyring)
    /// and `OONA_SIGNING_KEYS_<PLANE>` (a plane's, the plane in capitals),
    /// each [`Keyring::parse`]'s format; or the same names ending in
    /// `_FILE`, naming a file that holds it. No variable set: no keys.
    pub fn from_env() -> Result<Self> {
        Keys::from_vars(std::env::vars())
    }

    fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut keys = Keys::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(KEYS_ENV) else {
                continue;
            };
            let (scope, file) = match rest.strip_suffix("_FILE") {
                Some(s) => (s, true),
                None => (rest, false),
            };
            let plane = match scope.strip_prefix('_') {
                None if scope.is_empty() => None,
                Some(plane) if !plane.is_empty() => Some(plane.to_ascii_lowercase()),
                _ => continue, // another variable with this prefix
            };
            let keyring = if file {
                Keyring::from_file(&value)
            } else {
                Keyring::parse(&value)
            }
            .map_err(|e| Error::new(e.kind(), format!("{name}: {}", e.message())))?;
            match plane {
                Some(plane) => {
                    keys.planes.insert(plane, keyring);
                }
                None => keys.default = Some(keyring),
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE="; // 32 × 'a'
    const B: &str = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI="; // 32 × 'b'

    #[test]
    fn a_keyring_signs_with_its_first_key_and_lists_the_rest() {
        let k = Keyring::parse(&format!("k2:{B},\n# old\nk1:{A}")).unwrap();
        assert_eq!(k.current().0.as_str(), "k2");
        assert_eq!(k.current().1.expose(), [b'b'; 32]);
        assert_eq!(
            k.get("k1").map(|s| s.expose().to_vec()),
            Some(vec![b'a'; 32])
        );
        assert!(k.get("k3").is_none());
        let k = k.with_key(KeyId::new("k2").unwrap(), Secret::from_base64(A).unwrap());
        assert_eq!(k.current().0.as_str(), "k2", "a listed id keeps its place");
        assert_eq!(k.current().1.expose(), [b'a'; 32]);
    }

    #[test]
    fn secrets_never_print() {
        let k = Keyring::parse(&format!("k1:{A}")).unwrap();
        let shown = format!("{k:?} {:?} {}", k.current().1, k.current().1);
        assert!(!shown.contains("aaaa") && !shown.contains(A), "{shown}");
        assert!(
            shown.contains("k1") && shown.contains("redacted"),
            "{shown}"
        );
        let e = Keyring::parse("k1:not base64!").unwrap_err();
        assert!(!e.to_string().contains("not base64!"), "{e}");
    }

    #[test]
    fn bad_keyrings_are_config_errors() {
        for bad in ["", "k1", "k 1:{A}", &format!("k1:{A},k1:{B}"), "k1:YWJj"] {
            let e = Keyring::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{bad:?}: {e}");
        }
        let e = Keyring::parse("k1:YWJj").unwrap_err();
        assert!(e.to_string().contains("at least 32 bytes"), "{e}");
    }

    #[test]
    fn keys_by_plane_from_the_environment() {
        let dir = std::env::temp_dir().join(format!("oona-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("control.keys");
        std::fs::write(&file, format!("ctl:{B}\n")).unwrap();
        let keys = Keys::from_vars([
            (KEYS_ENV.to_string(), format!("all:{A}")),
            (
                format!("{KEYS_ENV}_CONTROL_FILE"),
                file.display().to_string(),
            ),
            ("OONA_SIGNING_KEYSX".to_string(), "ignored".to_string()),
        ])
        .unwrap();
        let ctl = Topic::new("control.kasmina.commands").unwrap();
        let tel = Topic::new("telemetry.kasmina.stats").unwrap();
        assert_eq!(keys.for_topic(&ctl).unwrap().current().0.as_str(), "ctl");
        assert_eq!(keys.for_topic(&tel).unwrap().current().0.as_str(), "all");
        let e = Keys::from_vars([(format!("{KEYS_ENV}_DATA"), "k:x".to_string())]).unwrap_err();
        assert!(e.to_string().contains("OONA_SIGNING_KEYS_DATA"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
