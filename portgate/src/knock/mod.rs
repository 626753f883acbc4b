//! The knock: a single UDP datagram by which a client holding a key asks the daemon to open
//! a port to one source address, as fwknop's single-packet authorization does for
//! firewalls. This module is its wire format, signed and checked with HMAC-SHA256; what the
//! daemon then checks (the key exists and covers the port, the timestamp's window, the
//! nonce not seen before) is the caller's, with [`ReplayCache`] for the last.
//!
//! # Layout (version 1)
//!
//! All integers are big-endian. Offsets after the key name move with its length `n`.
//!
//! | Offset | Size | Field |
//! |---:|---:|---|
//! | 0 | 1 | version: 1 |
//! | 1 | 1 | `n`, the key name's length, 1 to [`MAX_KEY_NAME`] |
//! | 2 | `n` | the key name: ASCII letters, digits, `.`, `_`, `-` |
//! | 2+n | 1 | the port's protocol: 6 (TCP) or 17 (UDP) |
//! | 3+n | 2 | the port, 1 to 65535 |
//! | 5+n | 4 | the time-to-live asked for, in seconds, at least 1 |
//! | 9+n | 8 | the timestamp: seconds since the Unix epoch (UTC) |
//! | 17+n | 16 | a random nonce |
//! | 33+n | 1 | the family of the address the grant is for: 0 none (the datagram's source), 4, or 6 |
//! | 34+n | 0, 4 or 16 | that address |
//! | end-32 | 32 | HMAC-SHA256, keyed by the 32-byte key, over every byte before it |
//!
//! So a datagram is 67 to 146 bytes. Anything else is refused before any key is looked up:
//! shorter or longer, another version, a malformed field, or bytes left over.

mod keyfile;
mod replay;
mod send;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

pub use self::{
    keyfile::{KeyFile, KeyFileError},
    replay::{Refused, ReplayCache},
    send::{GrantFor, KnockRequest, knock},
};
use crate::model::Protocol;

/// The version this build writes and reads.
pub const VERSION: u8 = 1;
/// The longest key name.
pub const MAX_KEY_NAME: usize = 64;
/// The size of a key: 256 bits.
pub const KEY_BYTES: usize = 32;
/// The size of a nonce.
pub const NONCE_BYTES: usize = 16;
/// The size of the HMAC-SHA256 tag.
pub const TAG_BYTES: usize = 32;
/// The shortest datagram: a one-byte name, no address.
pub const MIN_BYTES: usize = 2 + 1 + 1 + 2 + 4 + 8 + NONCE_BYTES + 1 + TAG_BYTES;
/// The longest datagram: the longest name, an IPv6 address.
pub const MAX_BYTES: usize = MIN_BYTES - 1 + MAX_KEY_NAME + 16;
/// The knock listener's default port, as fwknop's.
pub const DEFAULT_PORT: u16 = 62201;

/// A client's key: 256 random bits, shown to its holder once.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; KEY_BYTES]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never printed: logs and errors must not carry it.
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A new key from the operating system's random source.
    #[must_use]
    pub fn generate() -> Self {
        Self(rand::random())
    }
}

/// What a knock asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Knock {
    /// The name of the key that signs it.
    pub key_name: String,
    /// The port's protocol.
    pub protocol: Protocol,
    /// The port to open.
    pub port: u16,
    /// How long the grant should last (the key's most caps it); whole seconds, at least 1.
    pub ttl: Duration,
    /// When it was made: seconds since the Unix epoch.
    pub timestamp: u64,
    /// Random, so that no two knocks are alike and a replay is recognised.
    pub nonce: [u8; NONCE_BYTES],
    /// The address the grant is for; `None`: the datagram's source address.
    pub address: Option<IpAddr>,
}

/// Why a datagram is not a valid knock. [`KnockError::reason`] names each for the audit
/// log and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KnockError {
    /// Shorter than the smallest datagram, or than its own fields say.
    #[error("the datagram is truncated ({0} bytes)")]
    Truncated(usize),
    /// Longer than the largest datagram.
    #[error("the datagram is oversized ({0} bytes; at most {MAX_BYTES})")]
    Oversized(usize),
    /// Another version than this build's.
    #[error("unknown version {0}")]
    Version(u8),
    /// A field outside its range, or bytes after the tag.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The tag is not the HMAC of the datagram under the named key.
    #[error("the signature does not match key {0:?}")]
    BadSignature(String),
}

impl KnockError {
    /// A short stable name for counting and auditing.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Truncated(_) => "truncated",
            Self::Oversized(_) => "oversized",
            Self::Version(_) => "version",
            Self::Malformed(_) => "malformed",
            Self::BadSignature(_) => "bad_signature",
        }
    }
}

/// A datagram whose fields are well formed, not yet checked against its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unverified<'a> {
    /// What it asks for.
    pub knock: Knock,
    /// The bytes the tag covers.
    signed: &'a [u8],
    /// The tag.
    tag: &'a [u8],
}

impl Unverified<'_> {
    /// The knock, if its tag is the HMAC-SHA256 of the signed bytes under `key`; compared
    /// in constant time.
    pub fn verify(self, key: &Key) -> Result<Knock, KnockError> {
        let mut mac = hmac(key);
        mac.update(self.signed);
        mac.verify_slice(self.tag)
            .map_err(|_| KnockError::BadSignature(self.knock.key_name.clone()))?;
        Ok(self.knock)
    }
}

fn hmac(key: &Key) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    <Hmac<Sha256>>::new_from_slice(&key.0).unwrap_or_else(|_| unreachable!("HMAC keys of any size"))
}

/// Whether `name` is a valid key name: 1 to [`MAX_KEY_NAME`] ASCII letters, digits, `.`,
/// `_` or `-`.
#[must_use]
pub fn valid_key_name(name: &str) -> bool {
    (1..=MAX_KEY_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The datagram of `knock`, signed with `key`. `Err` for a knock this format cannot carry
/// (an invalid key name, port 0, a TTL under a second or over `u32::MAX` seconds).
pub fn encode(knock: &Knock, key: &Key) -> Result<Vec<u8>, KnockError> {
    if !valid_key_name(&knock.key_name) {
        return Err(KnockError::Malformed("key name"));
    }
    if knock.port == 0 {
        return Err(KnockError::Malformed("port"));
    }
    let ttl = u32::try_from(knock.ttl.as_secs())
        .ok()
        .filter(|&ttl| ttl > 0)
        .ok_or(KnockError::Malformed("ttl"))?;
    let mut out = Vec::with_capacity(MAX_BYTES);
    out.push(VERSION);
    // At most MAX_KEY_NAME (64), checked above.
    out.push(u8::try_from(knock.key_name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(knock.key_name.as_bytes());
    out.push(knock.protocol.number());
    out.extend_from_slice(&knock.port.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&knock.timestamp.to_be_bytes());
    out.extend_from_slice(&knock.nonce);
    match knock.address {
        None => out.push(0),
        Some(IpAddr::V4(v4)) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    let mut mac = hmac(key);
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

/// Reads the fields of a datagram, without its key: the caller looks the key up by
/// [`Knock::key_name`] and calls [`Unverified::verify`]. Never reads past `bytes` and never
/// allocates more than a key name.
pub fn parse(bytes: &[u8]) -> Result<Unverified<'_>, KnockError> {
    if bytes.len() < MIN_BYTES {
        return Err(KnockError::Truncated(bytes.len()));
    }
    if bytes.len() > MAX_BYTES {
        return Err(KnockError::Oversized(bytes.len()));
    }
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
    let mut reader = Reader {
        rest: signed,
        total: bytes.len(),
    };
    let version = reader.byte()?;
    if version != VERSION {
        return Err(KnockError::Version(version));
    }
    let name_len = usize::from(reader.byte()?);
    let name = reader.take(name_len)?;
    let key_name = std::str::from_utf8(name)
        .ok()
        .filter(|name| valid_key_name(name))
        .ok_or(KnockError::Malformed("key name"))?
        .to_owned();
    let protocol =
        Protocol::from_number(reader.byte()?).ok_or(KnockError::Malformed("protocol"))?;
    let port = u16::from_be_bytes(reader.array()?);
    if port == 0 {
        return Err(KnockError::Malformed("port"));
    }
    let ttl = u32::from_be_bytes(reader.array()?);
    if ttl == 0 {
        return Err(KnockError::Malformed("ttl"));
    }
    let timestamp = u64::from_be_bytes(reader.array()?);
    let nonce = reader.array()?;
    let address = match reader.byte()? {
        0 => None,
        4 => Some(IpAddr::V4(Ipv4Addr::from(reader.array::<4>()?))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(reader.array::<16>()?))),
        _ => return Err(KnockError::Malformed("address family")),
    };
    if !reader.rest.is_empty() {
        return Err(KnockError::Malformed("bytes after the address"));
    }
    Ok(Unverified {
        knock: Knock {
            key_name,
            protocol,
            port,
            ttl: Duration::from_secs(u64::from(ttl)),
            timestamp,
            nonce,
            address,
        },
        signed,
        tag,
    })
}

/// Reads fields off the front of a datagram's signed bytes.
struct Reader<'a> {
    rest: &'a [u8],
    /// The whole datagram's length, for the error.
    total: usize,
}

impl<'a> Reader<'a> {
    /// The next `count` bytes; a datagram shorter than its fields say is truncated.
    fn take(&mut self, count: usize) -> Result<&'a [u8], KnockError> {
        if self.rest.len() < count {
            return Err(KnockError::Truncated(self.total));
        }
        let (head, rest) = self.rest.split_at(count);
        self.rest = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, KnockError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], KnockError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
