//! Reservations: a handshake on a limited port holds a connection slot from its SYN (or
//! from the packet that completes it) until the connection is established, or until the
//! reservation expires and a sweep gives the slot back.
//!
//! A reservation is live while `now - created_ns` is within the configured TTL. Its
//! `created_ns` changes by compare-and-exchange only: the handshake's last packet renews
//! it, and whoever takes it for good (the established connection, or a sweep of an
//! expired one) first swaps in [`PendingSyn::CLAIMED`], so exactly one of them gives the
//! slot back or keeps it. Entries made after a sweep read its clock are never expired by
//! it: the age saturates at zero rather than wrapping.

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_for_each_map_elem};
use portgate_common::{FlowKey, GateConfig, PendingSyn, Policy, capacity, defaults, stat};

use crate::{
    atomic::{compare_exchange, load},
    maps::{PENDING, bump_stat},
    slots::{self, Row},
};

const EEXIST: i32 = 17;

/// What [`reserve`] did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A new reservation now holds a slot.
    Made,
    /// The flow already holds a live reservation (a retransmission, or the other hook).
    Held,
    /// Refused: the port is full, holds its share of handshakes, or the map is full.
    Refused,
}

/// The configured reservation TTL.
#[inline(always)]
fn ttl(config: &GateConfig) -> u64 {
    if config.pending_ttl_ns == 0 {
        defaults::PENDING_TTL_NS
    } else {
        config.pending_ttl_ns
    }
}

/// Whether a reservation made (or renewed) at `created` is live at `now`.
#[inline(always)]
fn live(created: u64, now: u64, ttl: u64) -> bool {
    created != PendingSyn::CLAIMED && now.saturating_sub(created) <= ttl
}

/// Reserves a slot of the port of `policy` under its epoch for `flow`, unless the port
/// holds its `max_connections` (non-zero) or [`capacity::PENDING_PER_PORT`] handshakes
/// already, or the map is full. A dead reservation of the same flow (expired, or of an
/// earlier epoch) is given back first. Expired reservations are swept (gate-wide, at most
/// every [`defaults::SWEEP_INTERVAL_NS`]); a refusal tries once more after a sweep. The
/// reservation records the policy generation the handshake was judged under.
#[inline(always)]
pub fn reserve(config: &GateConfig, flow: &FlowKey, policy: &Policy, now: u64) -> Reservation {
    let epoch = policy.epoch;
    let ttl = ttl(config);
    // Userspace makes the row with a TCP port's policy; none means no policy now.
    let Some(row) = Row::of(&flow.home) else {
        return Reservation::Refused;
    };
    if let Some(entry) = PENDING.get_ptr_mut(flow) {
        // SAFETY: the pointer is into the map's value for `flow`.
        let created_field = unsafe { &raw mut (*entry).created_ns };
        // SAFETY: as above.
        let held_epoch = unsafe { (*entry).epoch };
        let created = load(created_field);
        if live(created, now, ttl) && held_epoch == epoch {
            return Reservation::Held;
        }
        if created == PendingSyn::CLAIMED
            || !compare_exchange(created_field, created, PendingSyn::CLAIMED)
        {
            // Someone else is taking it; this packet waits for the next retransmission.
            return Reservation::Refused;
        }
        let _unused = PENDING.remove(flow);
        row.give_back(held_epoch);
    }
    let mut outcome = try_reserve(row, flow, policy, now);
    // Due or not, whatever the outcome: a reservation whose handshake never completed
    // (its last ACK lost to a full accept queue, its client gone) holds its slot until a
    // sweep, so sweeps follow the handshakes, not only the refusals.
    if sweep_if_due(config, now) && outcome.is_err() {
        outcome = try_reserve(row, flow, policy, now);
    }
    match outcome {
        Ok(made_or_held) => made_or_held,
        Err(cause) => {
            if let Some(index) = cause {
                bump_stat(index);
            }
            Reservation::Refused
        }
    }
}

/// One attempt of [`reserve`]; a refusal carries the statistic that counts its cause
/// (`None`: the port is at its limit, which its own counters show).
#[inline(always)]
fn try_reserve(
    row: Row,
    flow: &FlowKey,
    policy: &Policy,
    now: u64,
) -> Result<Reservation, Option<u32>> {
    let (epoch, max) = (policy.epoch, policy.max_connections);
    if row.in_flight(epoch) >= capacity::PENDING_PER_PORT {
        return Err(Some(stat::PENDING_PORT_FULL));
    }
    if !row.take(epoch, max) {
        return Err(None);
    }
    let pending = PendingSyn {
        created_ns: now,
        epoch,
        generation: policy.generation,
    };
    match PENDING.insert(flow, pending, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(Reservation::Made),
        Err(err) => {
            row.give_back(epoch);
            if err == -EEXIST {
                // Another CPU reserved for the same flow in the meantime.
                Ok(Reservation::Held)
            } else {
                Err(Some(stat::PENDING_FULL))
            }
        }
    }
}

/// Whether the port of `policy` (its allocation `home`) has a slot free under its epoch
/// now, without taking it.
#[inline(always)]
pub fn has_room(home: &portgate_common::PortKey, policy: &Policy) -> bool {
    Row::of(home).is_some_and(|row| row.has_room(policy.epoch, policy.max_connections))
}

/// The handshake of `flow` is completing: whether it holds a live reservation of the
/// epoch of `policy`, renewed so that it is still live when the connection is
/// established, and marked as judged under `policy`'s generation.
#[inline(always)]
pub fn confirm(config: &GateConfig, flow: &FlowKey, policy: &Policy, now: u64) -> bool {
    let Some(entry) = PENDING.get_ptr_mut(flow) else {
        return false;
    };
    // SAFETY: the pointer is into the map's value for `flow`.
    let created_field = unsafe { &raw mut (*entry).created_ns };
    // SAFETY: as above.
    if unsafe { (*entry).epoch } != policy.epoch {
        return false;
    }
    let created = load(created_field);
    if !live(created, now, ttl(config)) {
        return false;
    }
    // SAFETY: as above. A plain store: the connection reads it once established, after
    // this packet is through.
    unsafe { (*entry).generation = policy.generation };
    // Renewed unless it was made after `now` was read; either way it is live unless a
    // sweep or the connection claimed it in between.
    created >= now || compare_exchange(created_field, created, now)
}

/// The established connection of `flow` takes its reservation for good: the reservation's
/// epoch, whose slot the connection now holds, and the policy generation its handshake was
/// judged under; `None` when it holds none (never made, or claimed by a sweep).
#[inline(always)]
pub fn claim(flow: &FlowKey) -> Option<(u32, u32)> {
    let entry = PENDING.get_ptr_mut(flow)?;
    // SAFETY: the pointer is into the map's value for `flow`.
    let created_field = unsafe { &raw mut (*entry).created_ns };
    // SAFETY: as above.
    let (epoch, generation) = unsafe { ((*entry).epoch, (*entry).generation) };
    // Only a renewal by another packet of the handshake can change it meanwhile.
    for _ in 0..16 {
        let created = load(created_field);
        if created == PendingSyn::CLAIMED {
            return None;
        }
        if compare_exchange(created_field, created, PendingSyn::CLAIMED) {
            let _unused = PENDING.remove(flow);
            return Some((epoch, generation));
        }
    }
    None
}

#[repr(C)]
struct SweepContext {
    now: u64,
    ttl: u64,
}

/// Sweeps expired reservations when nobody has in the last
/// [`defaults::SWEEP_INTERVAL_NS`] (one CPU wins the turn, gate-wide); returns whether it
/// swept. So a sweep walks the map at most once per interval, whatever the traffic.
#[inline(always)]
pub fn sweep_if_due(config: &GateConfig, now: u64) -> bool {
    let Some(clock) = slots::sweep_clock() else {
        return false;
    };
    let previous = load(clock);
    if now.saturating_sub(previous) < defaults::SWEEP_INTERVAL_NS
        || !compare_exchange(clock, previous, now)
    {
        return false;
    }
    bump_stat(stat::PENDING_SWEEPS);
    let mut context = SweepContext {
        now,
        ttl: ttl(config),
    };
    // SAFETY: the map pointer is the pending map's definition, the callback has the
    // signature the helper calls, and the context lives on this stack for the whole call.
    unsafe {
        bpf_for_each_map_elem(
            (&raw const PENDING).cast_mut().cast(),
            sweep_one as *mut c_void,
            (&raw mut context).cast(),
            0,
        );
    }
    true
}

/// `bpf_for_each_map_elem` callback: gives back one expired reservation. Returns 0 to go
/// on.
extern "C" fn sweep_one(
    _map: *mut c_void,
    key: *mut FlowKey,
    value: *mut PendingSyn,
    context: *mut SweepContext,
) -> u64 {
    // SAFETY: the helper passes valid pointers to this element and to our context. The
    // key is read in place, not copied: this callback's stack adds to the program's.
    let (flow, created_field, epoch, now, ttl) = unsafe {
        (
            &*key,
            &raw mut (*value).created_ns,
            (*value).epoch,
            (*context).now,
            (*context).ttl,
        )
    };
    let created = load(created_field);
    if created != PendingSyn::CLAIMED
        && !live(created, now, ttl)
        && compare_exchange(created_field, created, PendingSyn::CLAIMED)
    {
        // The row first: the element's memory is the key's.
        let row = Row::of(&flow.home);
        let _unused = PENDING.remove(flow);
        if let Some(row) = row {
            row.give_back(epoch);
        }
    }
    0
}
