//! The nonces of accepted knocks, remembered for as long as their timestamp is inside the
//! window, so that a datagram sent again is refused. Bounded: when it is full of live
//! entries, new knocks are refused rather than an old nonce forgotten.

use std::collections::{BTreeSet, HashSet};

use super::NONCE_BYTES;

/// Why [`ReplayCache::admit`] refused a knock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its timestamp is more than the window before now.
    #[error("the timestamp is too old")]
    Stale,
    /// Its timestamp is more than the window after now.
    #[error("the timestamp is in the future")]
    Future,
    /// Its nonce was seen inside the window.
    #[error("the nonce was seen before")]
    Replayed,
    /// The cache holds its most live entries.
    #[error("too many knocks inside the window")]
    Full,
}

impl Refused {
    /// A short stable name for counting and auditing.
    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Stale => "stale",
            Self::Future => "future",
            Self::Replayed => "replayed",
            Self::Full => "replay_cache_full",
        }
    }
}

/// The nonces of the knocks accepted inside the window, each forgotten once its
/// timestamp has left the window (a knock that old is refused as stale anyway).
#[derive(Debug)]
pub struct ReplayCache {
    /// How far (seconds) a timestamp may be from now, either way.
    window: u64,
    /// The most nonces held.
    capacity: usize,
    /// The nonces held, each with its key's name.
    seen: HashSet<(String, [u8; NONCE_BYTES])>,
    /// The same entries by the time (seconds) after which they may be forgotten.
    by_expiry: BTreeSet<(u64, String, [u8; NONCE_BYTES])>,
}

impl ReplayCache {
    /// A cache for timestamps within `window` seconds of now, holding at most `capacity`
    /// nonces.
    #[must_use]
    pub fn new(window: u64, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            seen: HashSet::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// Checks a knock of key `key_name` made at `timestamp` with `nonce`, at `now` (both
    /// seconds since the epoch), and remembers its nonce if it is admitted. Call it only
    /// for a knock whose signature was checked: an attacker without a key must not fill it.
    pub fn admit(
        &mut self,
        key_name: &str,
        nonce: [u8; NONCE_BYTES],
        timestamp: u64,
        now: u64,
    ) -> Result<(), Refused> {
        if timestamp.saturating_add(self.window) < now {
            return Err(Refused::Stale);
        }
        if timestamp > now.saturating_add(self.window) {
            return Err(Refused::Future);
        }
        self.forget_before(now);
        let entry = (key_name.to_owned(), nonce);
        if self.seen.contains(&entry) {
            return Err(Refused::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(Refused::Full);
        }
        // Refused as stale from then on: no need to remember it longer.
        let expires = timestamp.saturating_add(self.window);
        self.by_expiry.insert((expires, entry.0.clone(), entry.1));
        self.seen.insert(entry);
        Ok(())
    }

    /// How many nonces it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets the nonces whose timestamps left the window before `now`.
    fn forget_before(&mut self, now: u64) {
        while self
            .by_expiry
            .first()
            .is_some_and(|(expires, _, _)| *expires < now)
        {
            if let Some((_, name, nonce)) = self.by_expiry.pop_first() {
                self.seen.remove(&(name, nonce));
            }
        }
    }
}
