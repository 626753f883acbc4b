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

/// How many of them one key may hold, so that one key's knocks cannot crowd out the
/// others'.
pub const REPLAY_PER_KEY: usize = 4_096;

/// The most ports one key may list.
pub const MAX_KEY_PORTS: usize = 1_024;

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
    /// Who issued the live grant of `addr` on `id`, when known.
    pub(super) fn issued_by(&self, id: PortId, addr: IpAddr) -> Option<&Issuer> {
        self.issuers.get(&(id, addr)).map(|(by, _)| by)
    }

    /// The ring of `keys` and of the grants' issuers the store holds, taking knocks whose
    /// timestamps are within `window` of now and, for each key, later than its last knock
    /// the store kept (the nonces seen before are not known).
    #[must_use]
    pub fn new(keys: Vec<ClientKey>, grants: Vec<GrantIssued>, window: Duration) -> Self {
        let mut replay = ReplayCache::new(window.as_secs(), REPLAY_CAPACITY, REPLAY_PER_KEY);
        for key in &keys {
            replay.set_floor(&key.name, key.last_knock);
        }
        Self {
            keys: keys
                .into_iter()
                .map(|key| (key.name.clone(), key))
                .collect(),
            replay,
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
    /// The knock names an address and its key may not name that one.
    #[error("key {key:?} may not name {addr} as the address of its grant on {id}")]
    AddressNotAllowed {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
        /// The address named.
        addr: IpAddr,
    },
    /// The port is not allocated.
    #[error("{id} is not allocated")]
    NotAllocated {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
    },
    /// The port does not require authentication: a grant would mean nothing there.
    #[error("{id} does not require authentication")]
    AuthNotRequired {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
    },
    /// The timestamp or the nonce: stale, future, before the daemon started, replayed,
    /// or too many knocks at once.
    #[error("key {key:?}: {refused}")]
    Replay {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
        /// What the replay cache said.
        refused: Refused,
    },
    /// The port holds its most grants, or the kernel refused the grant.
    #[error("the grant was not made: {message}")]
    Grant {
        /// The key.
        key: String,
        /// The port.
        id: PortId,
        /// Why.
        message: String,
    },
    /// The source sent more knocks than the listener takes from one source, or the
    /// listener is full of sources it is holding back.
    #[error("too many knocks from this source")]
    RateLimited,
    /// The listener took its most knocks this second, from all sources together.
    #[error("too many knocks at the listener")]
    ListenerBusy,
}

impl KnockRefusal {
    /// A short stable name for counting and auditing.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Datagram(err) => err.reason(),
            Self::UnknownKey(_) => "unknown_key",
            Self::NotCovered { .. } => "not_covered",
            Self::AddressNotAllowed { .. } => "address_not_allowed",
            Self::NotAllocated { .. } => "not_allocated",
            Self::AuthNotRequired { .. } => "auth_not_required",
            Self::Replay { refused, .. } => refused.reason(),
            Self::Grant { .. } => "grant_failed",
            Self::RateLimited => "rate_limited",
            Self::ListenerBusy => "listener_busy",
        }
    }

    /// The key the knock named, once that is known and worth recording.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Datagram(KnockError::BadSignature(key))
            | Self::UnknownKey(key)
            | Self::NotCovered { key, .. }
            | Self::AddressNotAllowed { key, .. }
            | Self::NotAllocated { key, .. }
            | Self::AuthNotRequired { key, .. }
            | Self::Replay { key, .. }
            | Self::Grant { key, .. } => Some(key),
            Self::Datagram(_) | Self::RateLimited | Self::ListenerBusy => None,
        }
    }

    /// The port a signed knock asked for, once its signature is checked.
    #[must_use]
    pub const fn port(&self) -> Option<PortId> {
        match self {
            Self::NotCovered { id, .. }
            | Self::AddressNotAllowed { id, .. }
            | Self::NotAllocated { id, .. }
            | Self::AuthNotRequired { id, .. }
            | Self::Replay { id, .. }
            | Self::Grant { id, .. } => Some(*id),
            Self::Datagram(_) | Self::UnknownKey(_) | Self::RateLimited | Self::ListenerBusy => {
                None
            }
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
        let ports = key_ports(request.ports)?;
        let key = ClientKey {
            name: request.name,
            secret: rand::random::<[u8; CLIENT_KEY_BYTES]>(),
            ports,
            max_ttl: request.max_ttl,
            any_source: request.any_source,
            created_at: now_millis(),
            last_knock: 0,
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
            // Unless a revocation and a new key took the name meanwhile.
            let mut ring = self.keys.lock().await;
            if ring
                .keys
                .get(&key.name)
                .is_some_and(|held| held.created_at == key.created_at)
            {
                ring.keys.remove(&key.name);
            }
            return Err(PortError::state(
                format!("key {} was not saved. {STORE_ADVICE}", key.name),
                Some(Box::new(err)),
            ));
        }
        Ok(key)
    }

    /// Takes knocks whose timestamps are within `window` of now (`[auth] window`).
    pub async fn set_knock_window(&self, window: Duration) {
        self.keys.lock().await.replay.set_window(window.as_secs());
    }

    /// Every key, by name.
    pub async fn keys(&self) -> Vec<ClientKey> {
        self.keys.lock().await.keys.values().cloned().collect()
    }

    /// Revokes a key (administrators only): its knocks are refused from now on, and the
    /// grants it issued are withdrawn. The key goes from memory first, so that no knock
    /// checked from then on passes; if the store does not take the revocation, the key is
    /// put back and nothing else changes.
    pub async fn revoke_key(&self, name: &str, actor: Actor) -> Result<()> {
        admin_only(actor, "revoke keys")?;
        self.refuse_after_store_failure()?;
        let (commit, key, issued) = {
            let mut ring = self.keys.lock().await;
            let Some(key) = ring.keys.remove(name) else {
                return Err(PortError::InvalidPortRequest(format!(
                    "no key named {name:?}"
                )));
            };
            let this_key = Issuer::Key(name.to_owned());
            let issued: Vec<(PortId, IpAddr)> = ring
                .issuers
                .iter()
                .filter(|(_, (by, _))| *by == this_key)
                .map(|(grant, _)| *grant)
                .collect();
            let mut changes = vec![Change::DeleteKey(name.to_owned())];
            changes.extend(
                issued
                    .iter()
                    .map(|&(id, addr)| Change::DeleteGrant(id, addr)),
            );
            (self.store.submit(changes), key, issued)
        };
        if let Err(err) = commit.wait().await {
            // Back where it was, unless a new key took the name meanwhile (the store holds
            // that one then: its commit came after this one).
            self.keys
                .lock()
                .await
                .keys
                .entry(name.to_owned())
                .or_insert(key);
            return Err(PortError::state(
                format!("key {name} was not revoked: the store did not take it. {STORE_ADVICE}"),
                Some(Box::new(err)),
            ));
        }
        // Every grant is tried; a grant the kernel would not give up keeps its record,
        // so that it is listed as the key's until it expires or is withdrawn.
        let mut kept: Vec<((PortId, IpAddr), String)> = Vec::new();
        {
            let mut state = self.state.lock().await;
            let super::State { security, gate, .. } = &mut *state;
            for (id, addr) in issued {
                let withdrawn = gate
                    .as_mut()
                    .map_or(Ok(()), |gate| gate.remove_grant(id, addr));
                match withdrawn {
                    Ok(()) => security.remove_grant(id, addr),
                    Err(err) => kept.push(((id, addr), format!("{addr} on {id}: {err}"))),
                }
            }
        }
        let this_key = Issuer::Key(name.to_owned());
        self.keys
            .lock()
            .await
            .issuers
            .retain(|grant, (by, _)| *by != this_key || kept.iter().any(|(kept, _)| kept == grant));
        if kept.is_empty() {
            return Ok(());
        }
        let reasons: Vec<String> = kept.into_iter().map(|(_, reason)| reason).collect();
        Err(PortError::state(
            format!(
                "key {name} is revoked, but the kernel kept {} of its grants ({}): withdraw them with `portgate revoke PORT ADDR`",
                reasons.len(),
                reasons.join("; ")
            ),
            None,
        ))
    }

    /// Checks a knock datagram from `source` at `now` (seconds since the epoch) and, when
    /// it passes every check, grants its port to its address for min(asked, the key's
    /// most). A knock never shortens a grant its address already holds.
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
        let id = accepted.id;
        let held = self
            .allocation(id)
            .await
            .ok_or_else(|| KnockRefusal::NotAllocated {
                key: key.name.clone(),
                id,
            })?;
        if !held.access.require_authentication {
            return Err(KnockRefusal::AuthNotRequired {
                key: key.name.clone(),
                id,
            });
        }
        // The nonce is taken, and the key's last knock kept in the store before the grant
        // is made: a restart then refuses this datagram even if the grant outlives it.
        let kept = {
            let mut ring = self.keys.lock().await;
            let KeyRing { keys, replay, .. } = &mut *ring;
            let Some(held) = keys
                .get_mut(&key.name)
                .filter(|held| held.created_at == key.created_at)
            else {
                return Err(KnockRefusal::UnknownKey(key.name));
            };
            if let Err(refused) = replay.admit(&key.name, knock.nonce, knock.timestamp, now) {
                if replay.clock_behind(now) {
                    log::warn!(
                        "a knock was refused because the wall clock is further back than the window from the latest time it said: knocks are refused until it catches up"
                    );
                }
                return Err(KnockRefusal::Replay {
                    key: key.name.clone(),
                    id,
                    refused,
                });
            }
            (knock.timestamp > held.last_knock).then(|| {
                held.last_knock = knock.timestamp;
                self.store.submit(vec![Change::PutKey(held.clone())])
            })
        };
        if let Some(commit) = kept
            && let Err(err) = commit.wait().await
        {
            return Err(KnockRefusal::Grant {
                key: key.name.clone(),
                id,
                message: format!("the key's last knock was not saved: {err}"),
            });
        }
        let issuer = Issuer::Key(key.name.clone());
        let made = self
            .grant_issued(id, accepted.addr, accepted.ttl, Actor::Admin, issuer)
            .await
            .map_err(|err| KnockRefusal::Grant {
                key: key.name.clone(),
                id,
                message: err.to_string(),
            })?;
        // The key may have been revoked (and perhaps made again under its name) while the
        // grant was made: revoke_key took the grants it knew of before this one, so this
        // one goes now.
        let still_valid = self
            .keys
            .lock()
            .await
            .keys
            .get(&key.name)
            .is_some_and(|now_key| now_key.created_at == key.created_at);
        if !still_valid {
            if made {
                let _withdrawn = self.revoke_grant(id, accepted.addr, Actor::Admin).await;
            }
            return Err(KnockRefusal::UnknownKey(key.name));
        }
        Ok(accepted)
    }

    /// Records in `ring` that `issuer` issued the grant of `addr` on `id`, lasting `ttl`
    /// (the grant just made), and submits the record to the store; the caller waits for it
    /// after letting go of its locks. Records of grants expired by now are forgotten in the
    /// same commit, so the store holds live grants only.
    pub(super) fn note_issuer(
        &self,
        ring: &mut KeyRing,
        id: PortId,
        addr: IpAddr,
        issuer: Issuer,
        ttl: Duration,
    ) -> crate::store::Commit {
        let now = now_millis();
        let expires_at = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
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
            self.monitor.record_error(super::ErrorSource::Store);
            log::warn!("the record of the grant of {addr} on {id} was not removed: {err}");
        }
        Ok(())
    }
}

/// The grant a signed knock asks for, if its key allows it: a key made with
/// `--any-source` may name any address; another only the datagram's own source (a client
/// that signs its address keeps a held-back datagram from being used from elsewhere).
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
        Some(addr) if key.any_source || addr.to_canonical() == source => addr.to_canonical(),
        Some(addr) => {
            return Err(KnockRefusal::AddressNotAllowed {
                key: key.name.clone(),
                id,
                addr,
            });
        }
        None => source,
    };
    Ok(KnockAccepted {
        key: key.name.clone(),
        id,
        addr,
        ttl: knock.ttl.min(key.max_ttl),
    })
}

/// A new key's ports: each once, in order, none 0, at most [`MAX_KEY_PORTS`].
fn key_ports(mut ports: Vec<PortId>) -> Result<Vec<PortId>> {
    if let Some(zero) = ports.iter().find(|id| id.port == 0) {
        return Err(PortError::InvalidPortRequest(format!(
            "a key cannot open port 0 ({zero})"
        )));
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_KEY_PORTS {
        return Err(PortError::InvalidPortRequest(format!(
            "a key may list at most {MAX_KEY_PORTS} ports ({} given)",
            ports.len()
        )));
    }
    Ok(ports)
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
