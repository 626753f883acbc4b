//! Who may change what, and how much one local user may hold: so that one tenant can
//! neither change another's ports nor fill the range or the kernel's maps for everyone.

use std::time::Duration;

use super::{
    Actor, GRANT_SWEEP_PERIOD, PortAllocator,
    error::{PortError, Result},
    security::{MAX_ALLOWED_IPS, MAX_GRANT_TTL, MAX_GRANTS_PER_PORT},
};
use crate::{
    config::PortConfig,
    model::{Allocation, AllocationRequest, PortId},
};

/// The most allowlist prefixes one user may hold over all its ports (the kernel trie holds
/// 1,048,576 in all).
pub const MAX_PREFIXES_PER_USER: usize = MAX_ALLOWED_IPS;

/// May `actor` change `held`? Root and the admin group may change anything; a user only
/// what it allocated.
pub(super) fn authorize(held: &Allocation, actor: Actor) -> Result<()> {
    match actor {
        Actor::Admin => Ok(()),
        Actor::User(uid) if held.owner.uid == Some(uid) => Ok(()),
        Actor::User(uid) => Err(PortError::AccessDenied(format!(
            "uid {uid} did not allocate {} (owner {}): only its maker, root or the admin group may change it",
            held.id, held.owner.name
        ))),
    }
}

/// Refuses a new port for a user that holds `[ports] max_ports_per_user` already, or whose
/// prefixes would pass [`MAX_PREFIXES_PER_USER`] with the request's.
pub(super) fn check_new_port(
    allocator: &PortAllocator,
    config: &PortConfig,
    actor: Actor,
    request: &AllocationRequest,
) -> Result<()> {
    let Actor::User(uid) = actor else {
        return Ok(());
    };
    let max = config.max_ports_per_user;
    if max > 0 {
        let held = allocator
            .allocations()
            .filter(|held| held.owner.uid == Some(uid))
            .count();
        if held >= usize::try_from(max).unwrap_or(usize::MAX) {
            return Err(PortError::PolicyViolation(format!(
                "uid {uid} holds {held} ports (draining and quarantined ones count), the most one user may ([ports] max_ports_per_user = {max}): release some and let them drain and pass quarantine"
            )));
        }
    }
    check_prefix_budget(allocator, actor, None, request.access.allowed_ips.len())
}

/// Refuses a change that would give a user more than [`MAX_PREFIXES_PER_USER`] prefixes,
/// counting `wanted` for port `changing` (or a new port) instead of what it holds now.
pub(super) fn check_prefix_budget(
    allocator: &PortAllocator,
    actor: Actor,
    changing: Option<PortId>,
    wanted: usize,
) -> Result<()> {
    let Actor::User(uid) = actor else {
        return Ok(());
    };
    let others: usize = allocator
        .allocations()
        .filter(|held| held.owner.uid == Some(uid) && Some(held.id) != changing)
        .map(|held| held.access.allowed_ips.len())
        .sum();
    if others + wanted > MAX_PREFIXES_PER_USER {
        return Err(PortError::PolicyViolation(format!(
            "uid {uid} would hold {} allowlist prefixes over its ports, the most one user may is {MAX_PREFIXES_PER_USER}: merge prefixes into wider ones or release ports",
            others + wanted
        )));
    }
    Ok(())
}

/// Refuses a grant of no time or of more than [`MAX_GRANT_TTL`].
pub(super) fn check_grant_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_GRANT_TTL {
        return Err(PortError::InvalidPortRequest(format!(
            "a grant of {} is out of bounds: give a --ttl above 0 and at most {}",
            humantime::format_duration(ttl),
            humantime::format_duration(MAX_GRANT_TTL)
        )));
    }
    Ok(())
}

/// Refuses one more grant on a port that holds [`MAX_GRANTS_PER_PORT`] (`held`) already.
pub(super) fn check_grant_count(held: usize, id: PortId) -> Result<()> {
    if held >= MAX_GRANTS_PER_PORT {
        return Err(PortError::PolicyViolation(format!(
            "{id} holds {MAX_GRANTS_PER_PORT} grants, the most a port may: wait for some to expire (expired grants are swept every {}s)",
            GRANT_SWEEP_PERIOD.as_secs()
        )));
    }
    Ok(())
}
