//! TCP connection slots: taken when a SYN is admitted, confirmed when the connection is
//! established, given back when it closes or its handshake expires. Every change is one
//! atomic instruction on the port's [`ConnSlots`], so concurrent SYNs on several CPUs never
//! take more than `max_connections`.

use core::{arch::asm, ffi::c_void};

use aya_ebpf::helpers::generated::bpf_for_each_map_elem;
use portgate_common::{ConnSlots, FlowKey, GateConfig, PendingSyn, defaults, stat};

use crate::maps::{PENDING, SLOTS, bump_stat};

#[inline(always)]
fn row(port: u16) -> Option<*mut ConnSlots> {
    SLOTS.get_ptr_mut(u32::from(port))
}

// BPF has atomic fetch-and-add and compare-and-exchange from CPU v3 (kernel 5.12), but
// aya-build links for the default CPU (v1), where LLVM refuses to use an atomic's result,
// and it owns the flags that would select v3. So these three are written in BPF assembly,
// which the kernel's verifier accepts on any CPU setting.
// SAFETY (all three): `field` points into a live map value, 8-byte aligned; every writer of
// these fields is one of these atomic instructions (userspace only reads them).

#[inline(always)]
fn fetch_add(field: *mut u64, value: u64) -> u64 {
    let mut value = value;
    // SAFETY: see above.
    unsafe {
        asm!(
            "{value} = atomic_fetch_add((u64 *)({field} + 0), {value})",
            field = in(reg) field,
            value = inout(reg) value,
        );
    }
    value
}

#[inline(always)]
fn fetch_sub(field: *mut u64, value: u64) -> u64 {
    fetch_add(field, value.wrapping_neg())
}

#[inline(always)]
fn compare_exchange(field: *mut u64, current: u64, new: u64) -> bool {
    let mut seen = current;
    // SAFETY: see above.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({field} + 0, r0, {new})",
            field = in(reg) field,
            new = in(reg) new,
            inout("r0") seen,
        );
    }
    seen == current
}

/// Takes a slot on `port` unless it already holds `max` (0 is unlimited). When full, sweeps
/// expired reservations (at most every [`defaults::SWEEP_INTERVAL_NS`]) and tries once more.
#[inline(always)]
pub fn take(port: u16, max: u32, config: &GateConfig, now: u64) -> bool {
    let Some(row) = row(port) else {
        return false;
    };
    // SAFETY: `row` points into the array's value for `port`.
    let slots = unsafe { &raw mut (*row).slots };
    if try_take(slots, max) {
        return true;
    }
    sweep_if_due(port, config, now) && try_take(slots, max)
}

/// Whether `port` holds `max` slots or more (0 is unlimited): a plain read, so that a SYN to
/// a full port is refused before anything is written (a SYN flood on a full port then costs
/// a lookup, not an insert and a removal). [`take`] still decides atomically.
#[inline(always)]
pub fn is_full(port: u16, max: u32) -> bool {
    if max == 0 {
        return false;
    }
    let Some(row) = row(port) else {
        return true;
    };
    // SAFETY: `row` points into the array's value for `port`; an aligned u64 read is whole.
    let slots = unsafe { (&raw const (*row).slots).read_volatile() };
    slots >= u64::from(max)
}

/// Sweeps expired reservations when `port` has not done so in the last
/// [`defaults::SWEEP_INTERVAL_NS`] (one CPU wins the turn); returns whether it swept.
#[inline(always)]
pub fn sweep_if_due(port: u16, config: &GateConfig, now: u64) -> bool {
    let Some(row) = row(port) else {
        return false;
    };
    // SAFETY: `row` points into the array's value for `port`.
    let last_sweep = unsafe { &raw mut (*row).last_sweep_ns };
    // SAFETY: as above; a torn read is impossible for an aligned u64.
    let previous = unsafe { last_sweep.read_volatile() };
    if now.wrapping_sub(previous) < defaults::SWEEP_INTERVAL_NS
        || !compare_exchange(last_sweep, previous, now)
    {
        return false;
    }
    sweep_expired(config, now);
    true
}

#[inline(always)]
fn try_take(slots: *mut u64, max: u32) -> bool {
    let before = fetch_add(slots, 1);
    if max != 0 && before >= u64::from(max) {
        fetch_sub(slots, 1);
        return false;
    }
    true
}

/// Gives back one slot of `port`.
#[inline(always)]
pub fn release(port: u16) {
    if let Some(row) = row(port) {
        // SAFETY: `row` points into the array's value for `port`.
        fetch_sub(unsafe { &raw mut (*row).slots }, 1);
    }
}

/// A connection was established. `reserved` says whether its SYN already took the slot.
#[inline(always)]
pub fn establish(port: u16, reserved: bool) {
    if let Some(row) = row(port) {
        if !reserved {
            // SAFETY: `row` points into the array's value for `port`.
            fetch_add(unsafe { &raw mut (*row).slots }, 1);
        }
        // SAFETY: as above.
        fetch_add(unsafe { &raw mut (*row).established }, 1);
    }
}

/// A counted connection closed: its slot and its place among the established go.
#[inline(always)]
pub fn close(port: u16) {
    if let Some(row) = row(port) {
        // SAFETY: `row` points into the array's value for `port`.
        fetch_sub(unsafe { &raw mut (*row).slots }, 1);
        // SAFETY: as above.
        fetch_sub(unsafe { &raw mut (*row).established }, 1);
    }
}

#[repr(C)]
struct SweepContext {
    now: u64,
    ttl: u64,
}

/// Releases every reservation older than the configured handshake TTL.
#[inline(always)]
pub fn sweep_expired(config: &GateConfig, now: u64) {
    bump_stat(stat::PENDING_SWEEPS);
    let ttl = if config.pending_ttl_ns == 0 {
        defaults::PENDING_TTL_NS
    } else {
        config.pending_ttl_ns
    };
    let mut context = SweepContext { now, ttl };
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
}

/// `bpf_for_each_map_elem` callback: releases one expired reservation. Returns 0 to go on.
extern "C" fn sweep_one(
    _map: *mut c_void,
    key: *mut FlowKey,
    value: *mut PendingSyn,
    context: *mut SweepContext,
) -> u64 {
    // SAFETY: the helper passes valid pointers to this element and to our context.
    let (flow, created, now, ttl) =
        unsafe { (*key, (*value).created_ns, (*context).now, (*context).ttl) };
    // Only the caller that removes the entry releases its slot: exactly once.
    if now.wrapping_sub(created) > ttl && PENDING.remove(flow).is_ok() {
        release(flow.dport);
    }
    0
}
