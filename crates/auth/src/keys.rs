//! API keys (`AUTH=keys`): a keys file (`AUTH_KEYS_FILE`) lists the SHA-256 hash of each key
//! with the principal it stands for; the keys themselves are shown once, when made
//! ([`NewKey::generate`]), and stored nowhere.
//!
//! ```yaml
//! - {hash: "sha256:9f86d0…", principal: billing-job, tenant: acme, roles: [clerk]}
//! - {hash: "sha256:2c26b4…", principal: ops, tenants: [acme, beta], roles: [ops]}
//! ```
//!
//! A key is `sk_` and 32 random bytes in base64url (43 characters). Why a fast hash: a key
//! carries 256 bits of entropy, so nobody can guess one from its hash however fast the hash is;
//! the slow, salted hashes made for passwords (argon2, bcrypt) defend low-entropy secrets and
//! would only cost every request time. Why a hash-map lookup is not a timing oracle: the map is
//! keyed by the hash of the presented key, and an attacker who can time how far a lookup got
//! learns something about a SHA-256 output whose preimage they do not control, which tells them
//! nothing about any key.

use std::collections::HashMap;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sourced_core::Principal;

/// What every key starts with, so a key is recognisable (in logs, by secret scanners) and told
/// apart from a JWT.
pub const KEY_PREFIX: &str = "sk_";
/// Random bytes in a key.
pub const KEY_RANDOM_BYTES: usize = 32;
pub use crate::limits::KEYS_MAX;
/// How a hash is written in the keys file: `sha256:` and 64 lowercase hex digits.
pub const HASH_PREFIX: &str = "sha256:";

/// Why a keys file cannot be used: the file, and which entry says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeysFileError {
    /// Not YAML, or not a list.
    #[error("{file}: {message}")]
    File {
        /// The keys file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// One entry is wrong.
    #[error("{file}: entry {index}: {message}")]
    Entry {
        /// The keys file.
        file: String,
        /// The entry's index in the list, from 0.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    hash: String,
    principal: String,
    tenant: Option<String>,
    tenants: Option<Vec<String>>,
    #[serde(default)]
    roles: Vec<String>,
}

/// The loaded keys file: principals by key hash.
#[derive(Clone, Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<[u8; 32], Principal>,
}

/// The SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let digits = s.strip_prefix(HASH_PREFIX)?;
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl KeyStore {
    /// Parses a keys file's text; `file` names it in errors. Every entry is checked and every
    /// problem returned (the hash's shape, a principal id, one of `tenant` or `tenants`, role
    /// names, a hash listed twice).
    pub fn parse(file: &str, text: &str) -> Result<KeyStore, Vec<KeysFileError>> {
        let file_error = |message: String| vec![KeysFileError::File { file: file.to_owned(), message }];
        let doc: Value = yaml_serde::from_str(text).map_err(|e| file_error(format!("invalid YAML: {e}")))?;
        let list = match doc {
            Value::Null => Vec::new(),
            Value::Array(list) => list,
            _ => return Err(file_error("a keys file is a list of {hash, principal, tenant(s), roles}".into())),
        };
        if list.len() > KEYS_MAX {
            return Err(file_error(format!("{} entries, over the limit of {KEYS_MAX}", list.len())));
        }
        let mut by_hash = HashMap::with_capacity(list.len());
        let mut problems = Vec::new();
        for (index, entry) in list.into_iter().enumerate() {
            let problem = |message: String| KeysFileError::Entry { file: file.to_owned(), index, message };
            let raw: RawEntry = match serde_json::from_value(entry) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(problem(e.to_string()));
                    continue;
                }
            };
            let Some(hash) = parse_hash(&raw.hash) else {
                problems.push(problem(format!("hash must be '{HASH_PREFIX}' and 64 lowercase hex digits")));
                continue;
            };
            let tenants = match (raw.tenant, raw.tenants) {
                (Some(t), None) => vec![t],
                (None, Some(ts)) => ts,
                (Some(_), Some(_)) => {
                    problems.push(problem("give tenant or tenants, not both".into()));
                    continue;
                }
                (None, None) => {
                    problems.push(problem("tenant (or tenants) is required".into()));
                    continue;
                }
            };
            let principal = match Principal::new(&raw.principal, &tenants, &raw.roles) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(problem(e.to_string()));
                    continue;
                }
            };
            if by_hash.insert(hash, principal).is_some() {
                problems.push(problem("this hash is listed twice".into()));
            }
        }
        if problems.is_empty() { Ok(KeyStore { by_hash }) } else { Err(problems) }
    }

    /// The principal of a presented key, if the file lists its hash.
    pub fn lookup(&self, key: &str) -> Option<&Principal> {
        self.by_hash.get(&hash_key(key))
    }

    /// How many keys are loaded.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no key is loaded.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// A fresh key, for `sourced key new --principal P --tenant T --role R`: the key to hand over
/// once, and the keys file line that admits it.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// The key (`sk_…`): shown once, stored nowhere.
    pub key: String,
    /// The line to append to the keys file.
    pub line: String,
}

impl NewKey {
    /// Draws a key from the system's random source for `principal` (checked like a keys file
    /// entry, so the line always loads).
    pub fn generate(principal: &Principal) -> Result<NewKey, ring::error::Unspecified> {
        let mut bytes = [0u8; KEY_RANDOM_BYTES];
        SystemRandom::new().fill(&mut bytes)?;
        Ok(NewKey::from_random(&bytes, principal))
    }

    /// [`NewKey::generate`] with the random bytes given (tests).
    pub fn from_random(bytes: &[u8; KEY_RANDOM_BYTES], principal: &Principal) -> NewKey {
        let key = format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        let mut entry = serde_json::Map::new();
        entry.insert("hash".into(), format!("{HASH_PREFIX}{}", hex(&hash_key(&key))).into());
        entry.insert("principal".into(), principal.id.clone().into());
        match principal.tenants.as_slice() {
            [one] => entry.insert("tenant".into(), one.as_str().into()),
            many => entry.insert("tenants".into(), many.iter().map(|t| Value::from(t.as_str())).collect()),
        };
        entry.insert("roles".into(), principal.roles.iter().map(|r| Value::from(r.as_str())).collect());
        // JSON is YAML: a flow mapping with every string quoted, whatever it holds.
        let line = format!("- {}", Value::Object(entry));
        NewKey { key, line }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(tenants: &[&str], roles: &[&str]) -> Principal {
        Principal::new("billing-job", tenants, roles).unwrap()
    }

    #[test]
    fn a_new_key_loads_from_its_line_and_finds_its_principal() {
        let p = principal(&["acme"], &["clerk"]);
        let made = NewKey::generate(&p).unwrap();
        assert!(made.key.starts_with("sk_") && made.key.len() == 3 + 43, "{}", made.key);
        let other = NewKey::generate(&principal(&["acme", "beta"], &[])).unwrap();
        assert_ne!(made.key, other.key);
        let text = format!("# keys\n{}\n{}\n", made.line, other.line);
        let store = KeyStore::parse("keys.yaml", &text).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.lookup(&made.key), Some(&p));
        assert_eq!(store.lookup(&other.key).unwrap().tenants.len(), 2);
        assert_eq!(store.lookup("sk_not-a-key"), None);
        assert!(!made.line.contains(&made.key), "the line holds only the hash");
    }

    #[test]
    fn the_line_is_stable_for_given_bytes() {
        let made = NewKey::from_random(&[7; 32], &principal(&["acme"], &["clerk", "app:ops"]));
        assert_eq!(made.key, "sk_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc");
        assert_eq!(
            made.line,
            format!(
                r#"- {{"hash":"sha256:{}","principal":"billing-job","tenant":"acme","roles":["clerk","app:ops"]}}"#,
                hex(&hash_key(&made.key))
            )
        );
    }

    #[test]
    fn every_bad_entry_is_reported_with_its_index() {
        let good = format!("sha256:{}", "a".repeat(64));
        let text = format!(
            r#"
- {{hash: "{good}", principal: a, tenant: acme, roles: [clerk]}}
- {{hash: "sha256:XYZ", principal: b, tenant: acme}}
- {{hash: "{good}", principal: c, tenant: acme}}
- {{hash: "sha256:{b}", principal: d}}
- {{hash: "sha256:{b}", principal: e, tenant: acme, tenants: [beta]}}
- {{hash: "sha256:{b}", principal: "", tenant: acme}}
- {{hash: "sha256:{b}", principal: f, tenant: "..", roles: []}}
- {{hash: "sha256:{b}", principal: g, tenant: acme, roles: ["has space"]}}
- {{hash: "sha256:{b}", principal: h, tenant: acme, colour: blue}}
- just a string
"#,
            b = "b".repeat(64)
        );
        let errors = KeyStore::parse("keys.yaml", &text).unwrap_err();
        let got: Vec<(usize, String)> = errors
            .iter()
            .map(|e| match e {
                KeysFileError::Entry { index, message, .. } => (*index, message.clone()),
                other => panic!("{other}"),
            })
            .collect();
        let indexes: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2, 3, 4, 5, 6, 7, 8, 9], "{got:#?}");
        assert!(got[0].1.contains("64 lowercase hex"), "{got:?}");
        assert!(got[1].1.contains("listed twice"), "{got:?}");
        assert!(got[2].1.contains("tenant (or tenants) is required"), "{got:?}");
        assert!(got[3].1.contains("not both"), "{got:?}");
        assert!(got[4].1.contains("principal id"), "{got:?}");
        assert!(got[5].1.contains("tenant"), "{got:?}");
        assert!(got[6].1.contains("role"), "{got:?}");
        assert!(got[7].1.contains("colour"), "{got:?}");
        assert_eq!(errors[0].to_string(), "keys.yaml: entry 1: hash must be 'sha256:' and 64 lowercase hex digits");
    }

    #[test]
    fn a_file_that_is_not_a_list_is_one_error() {
        let e = KeyStore::parse("keys.yaml", "keys: {}").unwrap_err();
        assert!(matches!(&e[..], [KeysFileError::File { .. }]), "{e:?}");
        let e = KeyStore::parse("keys.yaml", "- [unclosed").unwrap_err();
        assert!(e[0].to_string().starts_with("keys.yaml: invalid YAML"), "{e:?}");
        assert!(KeyStore::parse("keys.yaml", "").unwrap().is_empty());
    }
}
