//! What `portgate top` shows, built from successive reads of the API: no terminal, no
//! socket, no clock of its own (each read comes with the instant it was taken), so that
//! every rule here is tested on its own.
//!
//! Rates are counter deltas between two reads divided by the time between them: a port's
//! first read, or a counter that went down (the daemon restarted, the port was allocated
//! again), has no rate yet.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, VecDeque},
    time::Instant,
};

use crate::{
    api::{AllocationView, EventView, StatusView},
    model::{DropReason, PortId, PortMetrics, PortReport, PortStatus},
};

/// How many deny events the scroll buffer keeps (older ones fall off).
pub const EVENT_BUFFER: usize = 200;

/// One read of the daemon: its allocations, every port's counters and its status.
#[derive(Clone, Debug)]
pub struct Reading {
    /// `GET /v1/ports`.
    pub allocations: Vec<AllocationView>,
    /// `GET /v1/stats`.
    pub reports: Vec<PortReport>,
    /// `GET /v1/status`.
    pub status: StatusView,
}

/// Drops per second by reason, in [`DropReason::ALL`]'s order.
pub type DropRates = [f64; DropReason::ALL.len()];

/// One port's row.
#[derive(Clone, Debug, PartialEq)]
pub struct PortRow {
    /// The port.
    pub id: PortId,
    /// Its namespace as the NETNS column of `list` names it.
    pub netns: String,
    /// The owner's name; `None` for a managed port with counters but no allocation.
    pub owner: Option<String>,
    /// Active, Draining, Closed (Available for a port without allocation).
    pub status: PortStatus,
    /// Established connections now.
    pub connections: u64,
    /// The connection limit; 0: none.
    pub limit: u32,
    /// The counters of the last read.
    pub counters: PortMetrics,
    /// New connections let in per second; `None` until two reads were compared.
    pub accept_rate: Option<f64>,
    /// Drops per second by reason; `None` until two reads were compared.
    pub drop_rates: Option<DropRates>,
}

impl PortRow {
    /// Every reason's drops per second together.
    #[must_use]
    pub fn drop_rate(&self) -> Option<f64> {
        self.drop_rates.map(|rates| rates.iter().sum())
    }
}

/// The column the ports are sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortColumn {
    /// Port, then protocol and namespace.
    #[default]
    Port,
    /// Owner name.
    Owner,
    /// Status.
    Status,
    /// Established connections.
    Connections,
    /// New connections per second.
    AcceptRate,
    /// Drops per second, every reason together.
    DropRate,
}

impl SortColumn {
    /// The column's name in the header line.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Port => "port",
            Self::Owner => "owner",
            Self::Status => "status",
            Self::Connections => "connections",
            Self::AcceptRate => "conn/s",
            Self::DropRate => "drop/s",
        }
    }

    /// The key that picks it.
    #[must_use]
    pub const fn key(self) -> char {
        match self {
            Self::Port => 'p',
            Self::Owner => 'o',
            Self::Status => 's',
            Self::Connections => 'c',
            Self::AcceptRate => 'a',
            Self::DropRate => 'd',
        }
    }

    /// Every column, in the footer's order.
    pub const ALL: [Self; 6] = [
        Self::Port,
        Self::Owner,
        Self::Status,
        Self::Connections,
        Self::AcceptRate,
        Self::DropRate,
    ];

    /// The column `key` picks.
    #[must_use]
    pub fn of_key(key: char) -> Option<Self> {
        Self::ALL.into_iter().find(|column| column.key() == key)
    }

    /// How two rows compare on this column (ascending); ties are left to the caller.
    fn compare(self, a: &PortRow, b: &PortRow) -> Ordering {
        let rate = |rate: Option<f64>| rate.unwrap_or(-1.0);
        match self {
            Self::Port => Ordering::Equal,
            Self::Owner => a.owner.cmp(&b.owner),
            Self::Status => status_rank(a.status).cmp(&status_rank(b.status)),
            Self::Connections => a.connections.cmp(&b.connections),
            Self::AcceptRate => rate(a.accept_rate).total_cmp(&rate(b.accept_rate)),
            Self::DropRate => rate(a.drop_rate()).total_cmp(&rate(b.drop_rate())),
        }
    }
}

/// Statuses in the order of a port's life.
const fn status_rank(status: PortStatus) -> u8 {
    match status {
        PortStatus::Active => 0,
        PortStatus::Draining => 1,
        PortStatus::Closed => 2,
        PortStatus::Available => 3,
    }
}

/// Whether the daemon answered the last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// The last read succeeded.
    Up,
    /// The last read failed: the client's message. The rows are those of the last read
    /// that succeeded.
    Down(String),
}

/// The whole view's state.
#[derive(Debug)]
pub struct Top {
    rows: Vec<PortRow>,
    /// Drops per second by reason over every port; `None` before two reads.
    drop_totals: Option<DropRates>,
    /// Each port's counters and when they were read, to compute the next rates.
    previous: BTreeMap<PortId, (PortMetrics, Instant)>,
    events: VecDeque<EventView>,
    /// After the event stream was opened again: the newest event time shown before, so
    /// that the daemon's replay of events already shown is skipped.
    replayed_until: Option<u64>,
    status: Option<StatusView>,
    link: Link,
    sort: SortColumn,
    reverse: bool,
}

impl Default for Top {
    fn default() -> Self {
        Self::new()
    }
}

impl Top {
    /// An empty view, sorted by port.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            rows: Vec::new(),
            drop_totals: None,
            previous: BTreeMap::new(),
            events: VecDeque::new(),
            replayed_until: None,
            status: None,
            link: Link::Up,
            sort: SortColumn::Port,
            reverse: false,
        }
    }

    /// Takes a read made at `at`: new rows, rates against the previous read of each port.
    pub fn observe(&mut self, reading: Reading, at: Instant) {
        let mut allocations: BTreeMap<PortId, AllocationView> = reading
            .allocations
            .into_iter()
            .map(|view| (view.id, view))
            .collect();
        let mut rows = Vec::with_capacity(reading.reports.len().max(allocations.len()));
        let mut previous = BTreeMap::new();
        let mut totals: Option<DropRates> = None;
        for report in reading.reports {
            let held = allocations.remove(&report.id);
            let (accept_rate, drop_rates) = match self.previous.get(&report.id) {
                Some((before, then)) => rates(before, &report.counters, at - *then),
                None => (None, None),
            };
            if let Some(port) = drop_rates {
                let sum = totals.get_or_insert([0.0; DropReason::ALL.len()]);
                for (total, rate) in sum.iter_mut().zip(port) {
                    *total += rate;
                }
            }
            previous.insert(report.id, (report.counters.clone(), at));
            rows.push(row(report, held.as_ref(), accept_rate, drop_rates));
        }
        // An allocation the kernel has no record for yet (the read fell between the two).
        for held in allocations.into_values() {
            rows.push(allocation_row(held));
        }
        self.rows = rows;
        self.previous = previous;
        self.drop_totals = totals;
        self.status = Some(reading.status);
        self.link = Link::Up;
        self.sort_rows();
    }

    /// A read failed: the rows stay as they were, the failure is shown.
    pub fn lost(&mut self, message: String) {
        self.link = Link::Down(message);
    }

    /// The event stream was opened (again): what it replays first, the events the daemon
    /// holds, is skipped up to the newest already shown.
    pub fn events_reopened(&mut self) {
        self.replayed_until = self.events.front().map(|event| event.time);
    }

    /// A deny event arrived; the newest is first.
    pub fn event(&mut self, event: EventView) {
        if let Some(until) = self.replayed_until {
            if event.time <= until {
                return;
            }
            self.replayed_until = None;
        }
        self.events.push_front(event);
        self.events.truncate(EVENT_BUFFER);
    }

    /// Sorts by `column`; picking the column already sorted by reverses the order.
    pub fn sort_by(&mut self, column: SortColumn) {
        if self.sort == column {
            self.reverse = !self.reverse;
        } else {
            self.sort = column;
            self.reverse = false;
        }
        self.sort_rows();
    }

    /// Reverses the order.
    pub fn reverse(&mut self) {
        self.reverse = !self.reverse;
        self.sort_rows();
    }

    fn sort_rows(&mut self) {
        let (column, reverse) = (self.sort, self.reverse);
        self.rows.sort_by(|a, b| {
            let order = column.compare(a, b).then_with(|| a.id.cmp(&b.id));
            if reverse { order.reverse() } else { order }
        });
    }

    /// The rows, in the chosen order.
    #[must_use]
    pub fn rows(&self) -> &[PortRow] {
        &self.rows
    }

    /// Drops per second by reason over every port; `None` before two reads.
    #[must_use]
    pub const fn drop_totals(&self) -> Option<DropRates> {
        self.drop_totals
    }

    /// Drops by reason counted over every port since the gate started.
    #[must_use]
    pub fn drop_counts(&self) -> [u64; DropReason::ALL.len()] {
        DropReason::ALL.map(|reason| {
            self.rows
                .iter()
                .map(|row| row.counters.dropped.get(reason))
                .sum()
        })
    }

    /// The deny events kept, newest first.
    pub fn events(&self) -> impl Iterator<Item = &EventView> {
        self.events.iter()
    }

    /// The daemon's status of the last read that succeeded.
    #[must_use]
    pub const fn status(&self) -> Option<&StatusView> {
        self.status.as_ref()
    }

    /// Whether the daemon answered the last read.
    #[must_use]
    pub const fn link(&self) -> &Link {
        &self.link
    }

    /// The sort column and whether the order is reversed.
    #[must_use]
    pub const fn sort(&self) -> (SortColumn, bool) {
        (self.sort, self.reverse)
    }
}

/// New connections and drops by reason per second between two reads `elapsed` apart;
/// none when no time passed or a counter went down (it was reset).
fn rates(
    before: &PortMetrics,
    now: &PortMetrics,
    elapsed: std::time::Duration,
) -> (Option<f64>, Option<DropRates>) {
    let seconds = elapsed.as_secs_f64();
    let per_second = |before: u64, now: u64| {
        #[expect(
            clippy::cast_precision_loss,
            reason = "a rate on the screen; deltas past 2^52 do not happen between two reads"
        )]
        now.checked_sub(before).map(|delta| delta as f64 / seconds)
    };
    if seconds <= 0.0 {
        return (None, None);
    }
    let accepted = per_second(before.accepted, now.accepted);
    let mut drops = [0.0; DropReason::ALL.len()];
    for (rate, reason) in drops.iter_mut().zip(DropReason::ALL) {
        match per_second(before.dropped.get(reason), now.dropped.get(reason)) {
            Some(value) => *rate = value,
            None => return (accepted, None),
        }
    }
    (accepted, Some(drops))
}

/// The row of a port the kernel reported, with its allocation when it has one.
fn row(
    report: PortReport,
    held: Option<&AllocationView>,
    accept_rate: Option<f64>,
    drop_rates: Option<DropRates>,
) -> PortRow {
    let (netns, owner, connections) = match held {
        Some(view) => (
            view.id.netns.name(view.netns_label.as_deref()),
            Some(view.owner.clone()),
            view.connections,
        ),
        None => (report.id.netns.name(None), None, report.counters.active),
    };
    PortRow {
        id: report.id,
        netns,
        owner,
        status: held.map_or(report.status, |view| view.status),
        connections,
        limit: held.map_or(report.access.max_connections, |view| {
            view.access.max_connections
        }),
        counters: report.counters,
        accept_rate,
        drop_rates,
    }
}

/// The row of an allocation without a kernel report.
fn allocation_row(view: AllocationView) -> PortRow {
    PortRow {
        id: view.id,
        netns: view.id.netns.name(view.netns_label.as_deref()),
        owner: Some(view.owner),
        status: view.status,
        connections: view.connections,
        limit: view.access.max_connections,
        counters: PortMetrics::default(),
        accept_rate: None,
        drop_rates: None,
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
