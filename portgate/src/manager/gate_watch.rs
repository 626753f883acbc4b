//! The gate's watch, as the manager keeps it: the pins put back after they were removed
//! under the daemon, and the cgroup attachment lost when its cgroup was removed and made
//! again when it exists once more. The daemon's watch task calls
//! [`PortManager::check_gate`] every [`GATE_CHECK_PERIOD`]; what it found is logged by the
//! daemon, counted here (`portgate_gate_pins_restored_total`,
//! `portgate_gate_reattached_total`, `portgate_gate_detached`), and listed by `status`
//! ([`PortManager::gate_warnings`]).

use std::{
    path::Path,
    sync::{Mutex, PoisonError},
    time::{Duration, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::{PortError, PortManager, Result, monitor};
use crate::{
    gate::{CgroupLinks, PinsRestored},
    model::{UnixMillis, now_millis},
};

/// How often the daemon looks at its pins and its cgroup attachment.
pub const GATE_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// What one [`PortManager::check_gate`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateCheck {
    /// Pins that were gone and were pinned again.
    pub restored: PinsRestored,
    /// The cgroup links that were not attached to the configured cgroup.
    pub links: CgroupLinks,
    /// Whether the configured cgroup exists (now).
    pub cgroup_exists: bool,
    /// Whether the gate was attached to it again.
    pub reattached: bool,
}

/// The gate watch's metrics and what `status` says about it.
#[derive(Debug, Default)]
pub struct GateWatch {
    pins_restored: Counter,
    reattached: Counter,
    detached: Gauge,
    last: Mutex<Seen>,
}

/// What the watch saw last, for `status`.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// When pins were last put back, and how many times since start.
    restored: Option<(UnixMillis, u64)>,
    /// The configured cgroup, while the gate is not attached to it.
    detached_from: Option<String>,
}

impl GateWatch {
    /// Registers the watch's metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gate_pins_restored",
            "Pinned maps and links found removed under the running daemon and pinned again (enforcement never stopped: the daemon holds them)",
            self.pins_restored.clone(),
        );
        registry.register(
            "gate_reattached",
            "Times the cgroup programs were attached again after their cgroup was removed and made again",
            self.reattached.clone(),
        );
        registry.register(
            "gate_detached",
            "1 while the gate is not attached to its configured cgroup (it was removed): nothing in it is enforced",
            self.detached.clone(),
        );
    }

    fn record(&self, check: &GateCheck, cgroup: &Path) {
        let mut seen = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if check.restored.any() {
            let pins = check.restored.maps + check.restored.links + usize::from(check.restored.dir);
            self.pins_restored.inc_by(pins as u64);
            let times = seen.restored.map_or(0, |(_, times)| times) + 1;
            seen.restored = Some((now_millis(), times));
        }
        if check.reattached {
            self.reattached.inc();
        }
        let detached = !check.links.attached() && !check.reattached;
        self.detached.set(i64::from(detached));
        seen.detached_from = detached.then(|| cgroup.display().to_string());
    }

    /// What `status` says: pins put back, and a cgroup the gate is not attached to.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        let seen = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut warnings = Vec::new();
        if let Some(cgroup) = seen.detached_from {
            warnings.push(format!(
                "the gate is not attached to cgroup {cgroup}: it was removed, so nothing in it is enforced; the gate is attached again as soon as {cgroup} exists"
            ));
        }
        if let Some((when, times)) = seen.restored {
            warnings.push(format!(
                "the gate's pins were removed while the daemon ran and were pinned again ({times} times since start, last at {}); enforcement never stopped",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(when))
            ));
        }
        warnings
    }
}

/// The error of a check that could not be made or a pin that could not be put back.
fn watch_failed(err: crate::gate::GateError) -> PortError {
    PortError::host("keeping the gate's pins and cgroup attachment", err)
}

impl PortManager {
    /// Puts back removed pins, and attaches the gate to `cgroup` again when its links
    /// were detached from it (the cgroup was removed) and it exists again. Nothing to do
    /// without the gate. A failure is counted as a kernel error.
    pub async fn check_gate(&self, cgroup: &Path) -> Result<GateCheck> {
        let checked = self.try_check_gate(cgroup).await;
        if checked.is_err() {
            self.monitor.record_error(super::ErrorSource::Kernel);
        }
        checked
    }

    async fn try_check_gate(&self, cgroup: &Path) -> Result<GateCheck> {
        let mut check = GateCheck::default();
        {
            let mut state = self.state.lock().await;
            let Some(gate) = state.gate.as_mut() else {
                return Ok(check);
            };
            check.restored = gate.restore_pins().map_err(watch_failed)?;
            check.links = gate.cgroup_links(cgroup).map_err(watch_failed)?;
            check.cgroup_exists = cgroup.is_dir();
            if !check.links.attached() && check.cgroup_exists {
                gate.reattach_cgroup(cgroup).map_err(watch_failed)?;
                check.reattached = true;
            }
        }
        self.monitor.gate_watch().record(&check, cgroup);
        Ok(check)
    }

    /// What the kernel gate counted that an operator should know about (a full
    /// reservation map, connections left uncounted), and what the gate's watch found, as
    /// `status` shows it; none without the gate.
    pub async fn gate_warnings(&self) -> Result<Vec<String>> {
        let stats = {
            let state = self.state.lock().await;
            match state.gate.as_ref() {
                Some(gate) => gate.stats().map_err(PortError::counters)?,
                None => return Ok(Vec::new()),
            }
        };
        let mut warnings = self.monitor.gate_watch().warnings();
        warnings.extend(monitor::gate_warnings(&stats));
        Ok(warnings)
    }
}
