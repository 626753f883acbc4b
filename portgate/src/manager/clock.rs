//! The wall clock that leases, drain timeouts and quarantine are kept in, and its steps.
//!
//! Those deadlines are stored as wall-clock times (Unix milliseconds), so that they survive
//! restarts. A step of the wall clock while the daemon runs (an NTP correction, `date -s`)
//! would move each of them by the step: an hour forward would expire every lease with less
//! than an hour left, an hour back would hold every quarantined port an hour longer. So each
//! reading of the wall clock is compared with the monotonic clock's since the last one: when
//! the wall clock moved more than [`STEP_TOLERANCE`] further or less far, every pending
//! deadline is moved by the step, and each keeps the time it had left. Authentication grants
//! are kept on the monotonic clock (in the kernel) and never move. A step while the daemon
//! is stopped cannot be seen, nor told from time passing: the stored times are then taken as
//! they are. Time the machine spends suspended (which the monotonic clock does not count) is
//! taken as a step too: a deadline does not run while the machine sleeps.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{State, Ticked};
use crate::model::{Allocation, PortId, Timeline, UnixMillis, now_millis};

/// How far the wall clock may move from the monotonic clock between two readings before it
/// counts as a step (readings come at least every lifecycle tick, 200 ms apart).
pub const STEP_TOLERANCE: Duration = Duration::from_secs(2);

/// The last reading of the wall clock, with the monotonic clock's at the same moment, and
/// the allocations whose deadlines a step moved, as they were before (as the store holds
/// them) until the next lifecycle tick writes them.
#[derive(Debug, Default)]
pub(super) struct WallClock {
    last: Option<(Instant, UnixMillis)>,
    moved: BTreeMap<PortId, Allocation>,
}

impl WallClock {
    /// The wall clock now, and how far it stepped since the last reading (0: it did not).
    pub(super) fn read(&mut self) -> (UnixMillis, i64) {
        self.observe(Instant::now(), now_millis())
    }

    /// [`WallClock::read`] of the readings `(monotonic, wall)`.
    fn observe(&mut self, monotonic: Instant, wall: UnixMillis) -> (UnixMillis, i64) {
        let step = self.last.map_or(0, |(then, then_wall)| {
            let elapsed = millis(monotonic.saturating_duration_since(then));
            let moved = i64::try_from(wall).unwrap_or(i64::MAX)
                - i64::try_from(then_wall).unwrap_or(i64::MAX);
            let step = moved.saturating_sub(elapsed);
            if step.unsigned_abs() > u64::try_from(STEP_TOLERANCE.as_millis()).unwrap_or(0) {
                step
            } else {
                0
            }
        });
        self.last = Some((monotonic, wall));
        (wall, step)
    }
}

impl State {
    /// The wall clock now, for a change made under the state lock. When it stepped since
    /// the last reading, every allocation's pending deadlines are moved with it first (see
    /// the module's documentation).
    pub(super) fn now(&mut self) -> UnixMillis {
        let (now, step) = self.clock.read();
        if step != 0 {
            log::warn!(
                "the wall clock stepped by {step} ms: lease, drain and quarantine deadlines move with it, each keeping the time it had left"
            );
            let held: Vec<Allocation> = self.allocator.allocations().cloned().collect();
            for before in held {
                let mut moved = before.clone();
                shift_deadlines(&mut moved.timeline, step);
                if moved != before {
                    self.allocator.set(before.id, Some(moved));
                    self.clock.moved.entry(before.id).or_insert(before);
                }
            }
        }
        now
    }

    /// The lifecycle steps due now ([`super::PortAllocator::tick`]), with the allocations
    /// whose deadlines a step of the wall clock moved added to what is written (as they
    /// were before), so that the store holds the moved deadlines too.
    pub(super) fn lifecycle_tick(&mut self) -> Ticked {
        let now = self.now();
        let gate = self.gate.as_ref();
        let mut ticked = self
            .allocator
            .tick(now, |id| super::slots_in(gate, id).established);
        for (id, before) in std::mem::take(&mut self.clock.moved) {
            if !ticked.before.iter().any(|held| held.id == id) {
                ticked.before.push(before);
            }
        }
        ticked
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Moves the deadlines of `timeline` still to come by `step` milliseconds: the lease's
/// end, and the start of the drain and of quarantine (their timeout and end follow). When
/// it was allocated stays as it was (it is a fact, and the kernel policy's epoch).
pub(super) fn shift_deadlines(timeline: &mut Timeline, step: i64) {
    for at in [
        &mut timeline.lease_expires_at,
        &mut timeline.draining_since,
        &mut timeline.closed_at,
    ]
    .into_iter()
    .flatten()
    {
        *at = at.saturating_add_signed(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_what_the_wall_clock_moved_beyond_the_monotonic_clock() {
        let start = Instant::now();
        let mut clock = WallClock::default();
        assert_eq!(clock.observe(start, 1_000_000), (1_000_000, 0));
        // Time passing, with a little slew: no step.
        assert_eq!(
            clock.observe(start + Duration::from_millis(200), 1_000_250),
            (1_000_250, 0)
        );
        // An hour forward, then back.
        let (_, forward) = clock.observe(start + Duration::from_millis(400), 4_600_450);
        assert_eq!(forward, 3_600_000);
        let (_, back) = clock.observe(start + Duration::from_millis(600), 1_000_650);
        assert_eq!(back, -3_600_000);
    }

    #[test]
    fn only_pending_deadlines_move() {
        let mut timeline = Timeline::starting(1_000, Some(Duration::from_mins(1)));
        timeline.draining_since = Some(2_000);
        shift_deadlines(&mut timeline, -500);
        assert_eq!(timeline.allocated_at, 1_000);
        assert_eq!(timeline.lease_expires_at, Some(60_500));
        assert_eq!(timeline.draining_since, Some(1_500));
        assert_eq!(timeline.closed_at, None);
    }
}
