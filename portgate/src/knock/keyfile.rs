//! The key file a client keeps: its key's name and the key, in TOML, the key as 64
//! hexadecimal digits. `portgate key add` prints it once; `portgate knock --key-file`
//! reads it.
//!
//! ```toml
//! # portgate key file: keep it secret (mode 0600).
//! name = "alice"
//! key = "5e4f...64 hex digits"
//! any_source = true   # only for a key made with --any-source
//! ```

use serde::{Deserialize, Serialize};

use super::{KEY_BYTES, Key, valid_key_name};

/// A key file's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// The key's name, as the daemon knows it.
    pub name: String,
    /// The key.
    pub key: Key,
    /// Whether the key was made with `--any-source` (then `portgate knock` signs no
    /// address by default: the client is behind a NAT and its own address is not the one
    /// the daemon sees).
    pub any_source: bool,
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Not TOML, or fields missing or unknown.
    #[error("not a portgate key file: {0}")]
    Syntax(#[from] toml::de::Error),
    /// The name is not a valid key name.
    #[error("key name {0:?}: 1 to 64 ASCII letters, digits, '.', '_' or '-'")]
    Name(String),
    /// The key is not 64 hexadecimal digits.
    #[error("the key is not {} hexadecimal digits", 2 * KEY_BYTES)]
    Key,
}

/// The file's fields as written.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    name: String,
    key: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    any_source: bool,
}

impl KeyFile {
    /// The file's text.
    #[must_use]
    pub fn to_text(&self) -> String {
        let fields = Fields {
            name: self.name.clone(),
            key: hex::encode(self.key.0),
            any_source: self.any_source,
        };
        // Two strings and a flag: serializing cannot fail.
        let body = toml::to_string(&fields).unwrap_or_default();
        format!("# portgate key file: keep it secret (mode 0600).\n{body}")
    }

    /// Reads a key file's text.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let fields: Fields = toml::from_str(text)?;
        if !valid_key_name(&fields.name) {
            return Err(KeyFileError::Name(fields.name));
        }
        let mut key = [0; KEY_BYTES];
        hex::decode_to_slice(fields.key.trim(), &mut key).map_err(|_| KeyFileError::Key)?;
        Ok(Self {
            name: fields.name,
            key: Key(key),
            any_source: fields.any_source,
        })
    }
}
