//! The gate's watch task: every [`GATE_CHECK_PERIOD`], puts back the pins removed under
//! the running daemon (and locks the pin directory again when it was made anew, so that
//! a second daemon still finds it taken), and attaches the gate again to its cgroup when
//! the cgroup was removed and exists again. Says so in the log, once per finding.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;

use super::lock_pin_dir;
use crate::{
    manager::{GATE_CHECK_PERIOD, GateCheck, PortManager},
    text::Chain,
};

/// The daemon's lock on its pin directory, replaced when the directory is made again.
pub(super) type PinLock = Arc<Mutex<nix::fcntl::Flock<fs::File>>>;

/// Watches the gate attached to `cgroup` and pinned in the pin directory (held with its
/// lock) until shutdown.
pub(super) async fn watch_gate(
    manager: Arc<PortManager>,
    cgroup: PathBuf,
    (pin_dir, pin_lock): (PathBuf, PinLock),
    mut shutdown: watch::Receiver<bool>,
) {
    let mut was_failing = false;
    let mut was_detached = false;
    let mut ticks = tokio::time::interval(GATE_CHECK_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let check = match manager.check_gate(&cgroup).await {
            Ok(check) => check,
            Err(err) => {
                if !was_failing {
                    log::error!("checking the gate's pins and attachment: {}", Chain(&err));
                }
                was_failing = true;
                continue;
            }
        };
        if was_failing {
            log::info!("the gate's pins and attachment can be checked again");
            was_failing = false;
        }
        if check.restored.dir {
            match lock_pin_dir(&pin_dir) {
                Ok(lock) => {
                    *pin_lock.lock().unwrap_or_else(PoisonError::into_inner) = lock;
                }
                Err(err) => log::error!("locking the pin directory again: {err:#}"),
            }
        }
        was_detached = log_check(&check, &cgroup, &pin_dir, was_detached);
    }
}

/// Logs what `check` found; returns whether the gate is now detached from `cgroup`.
fn log_check(
    check: &GateCheck,
    cgroup: &std::path::Path,
    pin_dir: &std::path::Path,
    was_detached: bool,
) -> bool {
    if check.restored.any() {
        log::warn!(
            "the gate's pins under {} were removed while the daemon ran: pinned again {} maps and {} links{} (enforcement never stopped: the daemon holds them)",
            pin_dir.display(),
            check.restored.maps,
            check.restored.links,
            if check.restored.dir {
                ", in the directory made again"
            } else {
                ""
            }
        );
    }
    if check.reattached {
        log::warn!(
            "the gate's cgroup links were not attached to cgroup {} (it was removed and made again, or the configuration names another cgroup than the pinned links'): attached to it now",
            cgroup.display()
        );
        return false;
    }
    let detached = !check.links.attached();
    if detached && !was_detached {
        log::error!(
            "cgroup {} the gate was attached to was removed (links {}): nothing in it is enforced; the gate is attached again as soon as it exists",
            cgroup.display(),
            check
                .links
                .detached
                .iter()
                .chain(check.links.elsewhere.iter().map(|(name, _)| name))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    detached
}
