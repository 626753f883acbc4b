//! Client keys and the knock (issue #13): an administrator makes a key for a client; a
//! client's knock, signed with it, opens one port to one source for a while, through the
//! same grant an administrator would issue.
//!
//! Grants are objects here too: each remembers who issued it (an administrator, a user,
//! or a key), so that they can be listed and withdrawn one by one or with their key.
//!
//! Who issued each grant is kept in the store until the grant expires, so a restart keeps
//! it; a grant issued by a version without this record shows an unknown issuer.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use super::{Actor, PortError, PortManager, Result, STORE_ADVICE};
use crate::{
    knock::{self, Knock, KnockError, Refused, ReplayCache},
    model::{CLIENT_KEY_BYTES, ClientKey, GrantIssued, Issuer, PortId, UnixMillis, now_millis},
    store::Change,
};

/// How many knocks' nonces are remembered at once, within the window.
pub const REPLAY_CAPACITY: usize = 65_536;

/// How far from now a knock's timestamp may be, either way, by default.
pub const DEFAULT_KNOCK_WINDOW: Duration = Duration::from_secs(30);

/// The client keys, and what checking a knock remembers.
#[derive(Debug)]
pub struct KeyRing {
    keys: BTreeMap<String, ClientKey>,
    replay: ReplayCache,
    /// Who issued each live grant, and when it expires (wall clock).
    issuers: BTreeMap<(PortId, IpAddr), (Issuer, UnixMillis)>,
}

/// A grant as [`PortManager::grants`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantInfo {
    /// The address it lets in.
    pub addr: IpAddr,
    /// How long it still lasts.
    pub expires_in: Duration,
    /// Who issued it; `None` when unknown (issued before the daemon started).
    pub issued_by: Option<Issuer>,
}

impl KeyRing {
    /// The ring of `keys` and of the grants' issuers the store holds, taking knocks whose
    /// timestamps are within `window` of now.
    #[must_use]
    pub fn new(keys: Vec<ClientKey>, grants: Vec<GrantIssued>, window: Duration) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|key| (key.name.clone(), key))
                .collect(),
            replay: ReplayCache::new(window.as_secs(), REPLAY_CAPACITY),
            issuers: grants
                .into_iter()
                .map(|grant| ((grant.id, grant.addr), (grant.issuer, grant.expires_at)))
                .collect(),
        }
    }
}

/// What a new key is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRequest {
    /// Its name.
    pub name: String,
    /// The ports it may open (none: any port that requires authentication).
    pub ports: Vec<PortId>,
    /// The longest grant a knock with it gets.
    pub max_ttl: Duration,
    /// Whether a knock may name the address its grant is for.
    pub any_source: bool,
}

/// Why a knock was refused: a datagram's own fault, or the daemon's checks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KnockRefusal {
    /// Not a well-formed datagram, or its signature does not match.
    #[error(transparent)]
    Datagram(#[from] KnockError),
    /// No key of that name (never made, or revoked).
    #[error("no key {0:?}")]
    UnknownKey(String),
    /// The key does not cover the port.
    #[error("key {key:?} does not cover {id}")]
    NotCovered {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
    },
    /// The port is not allocated.
    #[error("{0} is not allocated")]
    NotAllocated(PortId),
    /// The knock names an address and its key may not.
    #[error("key {0:?} may not name the address of its grant")]
    AddressNotAllowed(String),
    /// The timestamp or the nonce: stale, future, replayed, or too many knocks at once.
    #[error(transparent)]
    Replay(#[from] Refused),
    /// The port holds its most grants, or the kernel refused the grant.
    #[error("the grant was not made: {0}")]
    Grant(String),
    /// The source sent more knocks than the listener takes from one source.
    #[error("too many knocks from this source")]
    RateLimited,
}

impl KnockRefusal {
    /// A short stable name for counting and auditing.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Datagram(err) => err.reason(),
            Self::UnknownKey(_) => "unknown_key",
            Self::NotCovered { .. } => "not_covered",
            Self::NotAllocated(_) => "not_allocated",
            Self::AddressNotAllowed(_) => "address_not_allowed",
            Self::Replay(refused) => refused.reason(),
            Self::Grant(_) => "grant_failed",
            Self::RateLimited => "rate_limited",
        }
    }

    /// The key the knock named, once that is known and worth recording.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Datagram(KnockError::BadSignature(key))
            | Self::UnknownKey(key)
            | Self::NotCovered { key, .. }
            | Self::AddressNotAllowed(key) => Some(key),
            _ => None,
        }
    }
}

/// A knock that opened a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnockAccepted {
    /// The key that signed it.
    pub key: String,
    /// The port opened.
    pub id: PortId,
    /// The address it is open to.
    pub addr: IpAddr,
    /// For how long.
    pub ttl: Duration,
}

impl PortManager {
    /// Makes a client key (administrators only), durable before it is returned: the
    /// caller shows its secret once.
    pub async fn add_key(&self, request: KeyRequest, actor: Actor) -> Result<ClientKey> {
        admin_only(actor, "make keys")?;
        if !knock::valid_key_name(&request.name) {
            return Err(PortError::InvalidPortRequest(format!(
                "key name {:?}: 1 to {} ASCII letters, digits, '.', '_' or '-'",
                request.name,
                knock::MAX_KEY_NAME
            )));
        }
        super::quota::check_grant_ttl(request.max_ttl)?;
        let key = ClientKey {
            name: request.name,
            secret: rand::random::<[u8; CLIENT_KEY_BYTES]>(),
            ports: request.ports,
            max_ttl: request.max_ttl,
            any_source: request.any_source,
            created_at: now_millis(),
        };
        self.refuse_after_store_failure()?;
        let commit = {
            let mut ring = self.keys.lock().await;
            if ring.keys.contains_key(&key.name) {
                return Err(PortError::InvalidPortRequest(format!(
                    "a key named {:?} exists already: revoke it first",
                    key.name
                )));
            }
            ring.keys.insert(key.name.clone(), key.clone());
            self.store.submit(vec![Change::PutKey(key.clone())])
        };
        if let Err(err) = commit.wait().await {
            self.keys.lock().await.keys.remove(&key.name);
            return Err(PortError::state(
                format!("key {} was not saved. {STORE_ADVICE}", key.name),
                Some(Box::new(err)),
            ));
        }
        Ok(key)
    }

    /// Takes knocks whose timestamps are within `window` of now (`[auth] window`).
    pub async fn set_knock_window(&self, window: Duration) {
        let mut ring = self.keys.lock().await;
        ring.replay = ReplayCache::new(window.as_secs(), REPLAY_CAPACITY);
    }

    /// Every key, by name.
    pub async fn keys(&self) -> Vec<ClientKey> {
        self.keys.lock().await.keys.values().cloned().collect()
    }

    /// Revokes a key (administrators only): its knocks are refused from now on, and the
    /// grants it issued since the daemon started are withdrawn.
    pub async fn revoke_key(&self, name: &str, actor: Actor) -> Result<()> {
        admin_only(actor, "revoke keys")?;
        self.refuse_after_store_failure()?;
        let (commit, issued) = {
            let mut ring = self.keys.lock().await;
            if ring.keys.remove(name).is_none() {
                return Err(PortError::InvalidPortRequest(format!(
                    "no key named {name:?}"
                )));
            }
            let this_key = Issuer::Key(name.to_owned());
            let issued: Vec<(PortId, IpAddr)> = ring
                .issuers
                .iter()
                .filter(|(_, (by, _))| *by == this_key)
                .map(|(grant, _)| *grant)
                .collect();
            let mut changes = vec![Change::DeleteKey(name.to_owned())];
            for &(id, addr) in &issued {
                ring.issuers.remove(&(id, addr));
                changes.push(Change::DeleteGrant(id, addr));
            }
            (self.store.submit(changes), issued)
        };
        {
            let mut state = self.state.lock().await;
            for (id, addr) in issued {
                let super::State { security, gate, .. } = &mut *state;
                if let Some(gate) = gate.as_mut() {
                    gate.remove_grant(id, addr)?;
                }
                security.remove_grant(id, addr);
            }
        }
        commit.wait().await.map_err(|err| {
            self.store_failed
                .store(true, std::sync::atomic::Ordering::Release);
            PortError::state(
                format!("the revocation of key {name} was not saved. {STORE_ADVICE}"),
                Some(Box::new(err)),
            )
        })
    }

    /// Checks a knock datagram from `source` at `now` (seconds since the epoch) and, when
    /// it passes every check, grants its port to its address for min(asked, the key's
    /// most).
    pub async fn knock(
        &self,
        datagram: &[u8],
        source: IpAddr,
        now: u64,
    ) -> std::result::Result<KnockAccepted, KnockRefusal> {
        let unverified = knock::parse(datagram)?;
        let (knock, key) = {
            let ring = self.keys.lock().await;
            let key = ring
                .keys
                .get(&unverified.knock.key_name)
                .ok_or_else(|| KnockRefusal::UnknownKey(unverified.knock.key_name.clone()))?
                .clone();
            (unverified.verify(&knock::Key(key.secret))?, key)
        };
        let accepted = admissible(&knock, &key, source)?;
        if self.allocation(accepted.id).await.is_none() {
            return Err(KnockRefusal::NotAllocated(accepted.id));
        }
        self.keys
            .lock()
            .await
            .replay
            .admit(&key.name, knock.nonce, knock.timestamp, now)?;
        self.grant_issued(
            accepted.id,
            accepted.addr,
            accepted.ttl,
            Actor::Admin,
            Issuer::Key(key.name.clone()),
        )
        .await
        .map_err(|err| KnockRefusal::Grant(err.to_string()))?;
        // The key may have been revoked while the grant was made: revoke_key took the
        // grants it knew of before this one, so this one goes now.
        if !self.keys.lock().await.keys.contains_key(&key.name) {
            let _withdrawn = self
                .revoke_grant(accepted.id, accepted.addr, Actor::Admin)
                .await;
            return Err(KnockRefusal::UnknownKey(key.name));
        }
        Ok(accepted)
    }

    /// Records who issued the grant of `addr` on `id`, lasting `ttl` (after the grant is
    /// made): in the store, waited for, and in memory. Records of grants expired by now are
    /// forgotten in the same commit, so the store holds live grants only.
    pub(super) async fn record_issuer(
        &self,
        id: PortId,
        addr: IpAddr,
        issuer: Issuer,
        ttl: Duration,
    ) {
        let now = now_millis();
        let expires_at = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let commit = {
            let mut ring = self.keys.lock().await;
            let expired: Vec<(PortId, IpAddr)> = ring
                .issuers
                .iter()
                .filter(|(_, (_, expires))| *expires <= now)
                .map(|(grant, _)| *grant)
                .collect();
            let mut changes: Vec<Change> = Vec::with_capacity(expired.len() + 1);
            for (id, addr) in expired {
                ring.issuers.remove(&(id, addr));
                changes.push(Change::DeleteGrant(id, addr));
            }
            ring.issuers
                .insert((id, addr), (issuer.clone(), expires_at));
            changes.push(Change::PutGrant(GrantIssued {
                id,
                addr,
                issuer,
                expires_at,
            }));
            self.store.submit(changes)
        };
        // The grant stands either way; only who issued it would be lost at a restart.
        if let Err(err) = commit.wait().await {
            log::warn!("who issued the grant of {addr} on {id} was not saved: {err}");
        }
    }

    /// The grants of a port, with who issued each (the port's maker or an administrator).
    pub async fn grants(&self, id: PortId, actor: Actor) -> Result<Vec<GrantInfo>> {
        let grants = {
            let state = self.state.lock().await;
            let held = state
                .allocator
                .allocation(id)
                .ok_or(PortError::NotAllocated(id))?;
            super::quota::authorize(held, actor)?;
            state.security.grants_of(id)
        };
        let now = crate::host::kernel::monotonic_now_ns();
        let ring = self.keys.lock().await;
        Ok(grants
            .into_iter()
            .filter(|(_, expires)| *expires > now)
            .map(|(addr, expires)| GrantInfo {
                addr,
                expires_in: Duration::from_nanos(expires - now),
                issued_by: ring.issuers.get(&(id, addr)).map(|(by, _)| by.clone()),
            })
            .collect())
    }

    /// Withdraws the grant of `addr` on `id` at once (the port's maker or an
    /// administrator): new connections from it are refused again.
    pub async fn revoke_grant(&self, id: PortId, addr: IpAddr, actor: Actor) -> Result<()> {
        {
            let mut state = self.state.lock().await;
            let held = state
                .allocator
                .allocation(id)
                .ok_or(PortError::NotAllocated(id))?;
            super::quota::authorize(held, actor)?;
            if !state.security.grants_of(id).iter().any(|(a, _)| *a == addr) {
                return Err(PortError::InvalidPortRequest(format!(
                    "{id} holds no grant for {addr}"
                )));
            }
            let super::State { security, gate, .. } = &mut *state;
            if let Some(gate) = gate.as_mut() {
                gate.remove_grant(id, addr)?;
            }
            security.remove_grant(id, addr);
        }
        self.keys.lock().await.issuers.remove(&(id, addr));
        if let Err(err) = self
            .store
            .submit(vec![Change::DeleteGrant(id, addr)])
            .wait()
            .await
        {
            log::warn!("the record of the grant of {addr} on {id} was not removed: {err}");
        }
        Ok(())
    }
}

/// The grant a signed knock asks for, if its key allows it.
fn admissible(
    knock: &Knock,
    key: &ClientKey,
    source: IpAddr,
) -> std::result::Result<KnockAccepted, KnockRefusal> {
    let id = PortId::new(knock.port, knock.protocol);
    if !key.covers(id) {
        return Err(KnockRefusal::NotCovered {
            key: key.name.clone(),
            id,
        });
    }
    let addr = match knock.address {
        Some(addr) if key.any_source => addr,
        Some(_) => return Err(KnockRefusal::AddressNotAllowed(key.name.clone())),
        None => source,
    };
    Ok(KnockAccepted {
        key: key.name.clone(),
        id,
        addr,
        ttl: knock.ttl.min(key.max_ttl),
    })
}

fn admin_only(actor: Actor, what: &str) -> Result<()> {
    match actor {
        Actor::Admin => Ok(()),
        Actor::User(uid) => Err(PortError::AccessDenied(format!(
            "only an administrator may {what} (uid {uid} is not one)"
        ))),
    }
}

/// Seconds since the epoch now, for [`PortManager::knock`].
#[must_use]
pub fn unix_now() -> u64 {
    now_millis() / 1000
}

#[cfg(test)]
mod tests;
