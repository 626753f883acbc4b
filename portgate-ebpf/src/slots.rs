//! TCP connection slots: taken by a reservation (a handshake in flight on a limited port)
//! or by a connection established on an unlimited one, given back when the reservation is
//! dropped or the connection closes.
//!
//! Each count is a [`slot_word`]: the allocation's epoch and the count in one u64, changed
//! by compare-and-exchange only. The first change under a new epoch starts the count from
//! zero, and a change under an earlier epoch leaves the word alone, so an earlier owner's
//! connections never count against the port's next owner, and concurrent handshakes on
//! several CPUs never take more than `max_connections`.

use portgate_common::{ConnSlots, PortKey, slot_word};

use crate::{
    atomic::{compare_exchange, load},
    maps::SLOTS,
};

/// Compare-and-exchange attempts before a change gives up. Every failed attempt means
/// another CPU changed the word, so this bounds the work without starving anyone in
/// practice; a take that gives up is refused like a full port.
const ATTEMPTS: usize = 16;

/// Adds one to the count of `epoch` in `word` unless it already holds `max` (0 is
/// unlimited); a word of another epoch counts as zero and is started again.
#[inline(always)]
fn add_one(word: *mut u64, epoch: u32, max: u32) -> bool {
    for _ in 0..ATTEMPTS {
        let seen = load(word);
        let count = slot_word::count_for(seen, epoch);
        if (max != 0 && count >= max) || count == u32::MAX {
            return false;
        }
        if compare_exchange(word, seen, slot_word::pack(epoch, count + 1)) {
            return true;
        }
    }
    false
}

/// Takes one from the count of `epoch` in `word`; a word of another epoch (or at zero) is
/// left alone.
#[inline(always)]
fn remove_one(word: *mut u64, epoch: u32) {
    for _ in 0..ATTEMPTS {
        let seen = load(word);
        if slot_word::epoch(seen) != epoch || slot_word::count(seen) == 0 {
            return;
        }
        if compare_exchange(word, seen, seen - 1) {
            return;
        }
    }
}

/// One port's slot row, looked up once per packet or connection and used for every step.
#[derive(Clone, Copy)]
pub struct Row(*mut ConnSlots);

impl Row {
    /// The slot row of `port`; userspace makes it with the port's policy.
    #[inline(always)]
    pub fn of(port: &PortKey) -> Option<Self> {
        SLOTS.get_ptr_mut(port).map(Self)
    }

    /// Takes a slot for `epoch` unless the row already holds `max` (0 is unlimited).
    #[inline(always)]
    pub fn take(self, epoch: u32, max: u32) -> bool {
        // SAFETY: the pointer is into the map's value for the row's port.
        add_one(unsafe { &raw mut (*self.0).slots }, epoch, max)
    }

    /// Whether a slot of `epoch` is free now (`max` 0 is unlimited); a plain read.
    #[inline(always)]
    pub fn has_room(self, epoch: u32, max: u32) -> bool {
        // SAFETY: as above.
        let slots = load(unsafe { &raw const (*self.0).slots });
        max == 0 || slot_word::count_for(slots, epoch) < max
    }

    /// Gives back one slot taken under `epoch`.
    #[inline(always)]
    pub fn give_back(self, epoch: u32) {
        // SAFETY: as above.
        remove_one(unsafe { &raw mut (*self.0).slots }, epoch);
    }

    /// Handshakes in flight under `epoch`: slots held that are not (yet) established
    /// connections. Two plain reads, so a bound, not an exact count.
    #[inline(always)]
    pub fn in_flight(self, epoch: u32) -> u32 {
        // SAFETY: as above.
        let (slots, established) = unsafe {
            (
                load(&raw const (*self.0).slots),
                load(&raw const (*self.0).established),
            )
        };
        slot_word::count_for(slots, epoch).saturating_sub(slot_word::count_for(established, epoch))
    }

    /// A connection holding a slot of `epoch` was established: it joins the port's active
    /// connections.
    #[inline(always)]
    pub fn establish(self, epoch: u32) {
        // SAFETY: as above.
        add_one(unsafe { &raw mut (*self.0).established }, epoch, 0);
    }

    /// A counted connection of `epoch` closed: its slot and its place among the
    /// established go.
    #[inline(always)]
    pub fn close(self, epoch: u32) {
        // SAFETY: as above.
        remove_one(unsafe { &raw mut (*self.0).established }, epoch);
        // SAFETY: as above.
        remove_one(unsafe { &raw mut (*self.0).slots }, epoch);
    }
}

/// The gate-wide sweep clock: `last_sweep_ns` of the row of [`PortKey::default`] (port 0
/// is never managed), which userspace makes when it installs the gate.
#[inline(always)]
pub fn sweep_clock() -> Option<*mut u64> {
    // SAFETY: the pointer is into the map's value for that key.
    Row::of(&PortKey::default()).map(|row| unsafe { &raw mut (*row.0).last_sweep_ns })
}
