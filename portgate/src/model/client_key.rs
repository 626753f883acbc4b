//! A client's key for the knock (see `portgate::knock`): what it may open, for how long,
//! and the secret both sides hold.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{PortId, UnixMillis};

/// The bytes of a client key's secret.
pub const CLIENT_KEY_BYTES: usize = 32;

/// A client key, as the store keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientKey {
    /// Its name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`; what a knock names.
    pub name: String,
    /// The secret, as hexadecimal digits in the store.
    #[serde(with = "hex_secret")]
    pub secret: [u8; CLIENT_KEY_BYTES],
    /// The ports it may open; empty: any port that requires authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortId>,
    /// The longest grant a knock with it gets.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Whether a knock may name the address its grant is for (clients behind NAT);
    /// otherwise the grant goes to the datagram's source address.
    #[serde(default)]
    pub any_source: bool,
    /// When it was made.
    pub created_at: UnixMillis,
    /// The timestamp (seconds since the epoch) of the latest knock accepted with it, kept
    /// before its grant is made: after a restart, knocks no later than it are refused, as
    /// the nonces of the knocks before the restart are not known.
    #[serde(default)]
    pub last_knock: u64,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ClientKey")
            .field("name", &self.name)
            .field("ports", &self.ports)
            .field("max_ttl", &self.max_ttl)
            .field("any_source", &self.any_source)
            .field("created_at", &self.created_at)
            .field("last_knock", &self.last_knock)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// Whether it may open `id`.
    #[must_use]
    pub fn covers(&self, id: PortId) -> bool {
        self.ports.is_empty() || self.ports.contains(&id)
    }
}

/// Who issued a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Issuer {
    /// An administrator, through the API.
    Administrator,
    /// A user (the port's maker), through the API.
    User(u32),
    /// A client's knock, with this key.
    Key(String),
}

impl std::fmt::Display for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Administrator => f.write_str("administrator"),
            Self::User(uid) => write!(f, "uid {uid}"),
            Self::Key(name) => write!(f, "key {name}"),
        }
    }
}

/// Who issued a live grant, as the store keeps it (the grant itself is the kernel's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantIssued {
    /// The port.
    pub id: PortId,
    /// The address granted.
    pub addr: IpAddr,
    /// Who issued it.
    pub issuer: Issuer,
    /// When it expires (wall clock), after which the record is forgotten.
    pub expires_at: UnixMillis,
}

/// The secret as 64 hexadecimal digits.
mod hex_secret {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use super::CLIENT_KEY_BYTES;

    pub fn serialize<S: Serializer>(
        secret: &[u8; CLIENT_KEY_BYTES],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(secret))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<[u8; CLIENT_KEY_BYTES], D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut secret = [0; CLIENT_KEY_BYTES];
        hex::decode_to_slice(text, &mut secret)
            .map_err(|_| D::Error::custom("a secret of 64 hexadecimal digits"))?;
        Ok(secret)
    }
}
