//! The nonces of accepted knocks, remembered for as long as their timestamp is inside the
//! window, so that a datagram sent again is refused. Bounded: when it is full of live
//! entries, new knocks are refused rather than an old nonce forgotten.

use std::collections::{BTreeSet, HashMap, HashSet};

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
    /// Its timestamp is no later than its key's last knock accepted before the daemon
    /// started: the nonces of the knocks taken before are not known, so such a knock
    /// might be one sent again.
    #[error("the timestamp is no later than the key's last knock before the daemon started")]
    BeforeRestart,
    /// Its nonce was seen inside the window.
    #[error("the nonce was seen before")]
    Replayed,
    /// The cache, or the key's share of it, holds its most live entries.
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
            Self::BeforeRestart => "before_restart",
            Self::Replayed => "replayed",
            Self::Full => "replay_cache_full",
        }
    }
}

/// The nonces of the knocks accepted inside the window, each forgotten once its
/// timestamp has left the window (a knock that old is refused as stale anyway).
///
/// Time only goes forward here: `now` is the latest it has been told, so a wall clock
/// stepped back cannot bring a forgotten nonce's timestamp back inside the window.
#[derive(Debug)]
pub struct ReplayCache {
    /// How far (seconds) a timestamp may be from now, either way.
    window: u64,
    /// The most nonces held.
    capacity: usize,
    /// The most nonces held for one key, so that one key cannot crowd out the others.
    per_key: usize,
    /// Timestamps before this (seconds since the epoch) are refused as stale: raised when
    /// the window widens, past the nonces forgotten under the narrower one.
    not_before: u64,
    /// For each key, its last knock accepted before the daemon started: its knocks must
    /// be later.
    floors: HashMap<String, u64>,
    /// The latest `now` seen.
    latest: u64,
    /// The nonces held, each with its key's name.
    seen: HashSet<(String, [u8; NONCE_BYTES])>,
    /// How many each key holds.
    held: HashMap<String, usize>,
    /// The same entries by their knock's timestamp, oldest first.
    by_time: BTreeSet<(u64, String, [u8; NONCE_BYTES])>,
}

impl ReplayCache {
    /// A cache for timestamps within `window` seconds of now, holding at most `capacity`
    /// nonces and at most `per_key` of one key.
    #[must_use]
    pub fn new(window: u64, capacity: usize, per_key: usize) -> Self {
        Self {
            window,
            capacity,
            per_key,
            not_before: 0,
            floors: HashMap::new(),
            latest: 0,
            seen: HashSet::new(),
            held: HashMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Takes timestamps within `window` seconds of now from now on, keeping the nonces
    /// it holds (each is forgotten once its timestamp leaves the window in force then). A
    /// wider window does not take the timestamps of nonces the narrower one forgot.
    pub fn set_window(&mut self, window: u64) {
        if window > self.window {
            self.not_before = self.not_before.max(self.latest.saturating_sub(self.window));
        }
        self.window = window;
    }

    /// Refuses knocks of `key_name` with timestamps no later than `last_knock`: the last
    /// one accepted before the daemon started (the store keeps it).
    pub fn set_floor(&mut self, key_name: &str, last_knock: u64) {
        if last_knock > 0 {
            self.floors.insert(key_name.to_owned(), last_knock);
        }
    }

    /// Whether the wall clock `now` is further back than the window from the latest time
    /// seen: it was stepped back, and knocks are refused as stale until it catches up.
    #[must_use]
    pub fn clock_behind(&self, now: u64) -> bool {
        now.saturating_add(self.window) < self.latest
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
        self.latest = self.latest.max(now);
        let now = self.latest;
        if timestamp.saturating_add(self.window) < now || timestamp < self.not_before {
            return Err(Refused::Stale);
        }
        if timestamp > now.saturating_add(self.window) {
            return Err(Refused::Future);
        }
        if self
            .floors
            .get(key_name)
            .is_some_and(|floor| timestamp <= *floor)
        {
            return Err(Refused::BeforeRestart);
        }
        self.forget_before(now);
        let entry = (key_name.to_owned(), nonce);
        if self.seen.contains(&entry) {
            return Err(Refused::Replayed);
        }
        let of_key = self.held.get(key_name).copied().unwrap_or(0);
        if self.seen.len() >= self.capacity || of_key >= self.per_key {
            return Err(Refused::Full);
        }
        self.by_time.insert((timestamp, entry.0.clone(), entry.1));
        *self.held.entry(entry.0.clone()).or_insert(0) += 1;
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

    /// Forgets the nonces whose timestamps left the window before `now`: a knock with one
    /// of them is refused as stale from then on.
    fn forget_before(&mut self, now: u64) {
        while self
            .by_time
            .first()
            .is_some_and(|(timestamp, _, _)| timestamp.saturating_add(self.window) < now)
        {
            if let Some((_, name, nonce)) = self.by_time.pop_first() {
                if let Some(count) = self.held.get_mut(&name) {
                    *count -= 1;
                    if *count == 0 {
                        self.held.remove(&name);
                    }
                }
                self.seen.remove(&(name, nonce));
            }
        }
    }
}
