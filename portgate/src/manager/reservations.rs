//! The kernel's reserved ports (`net.ipv4.ip_local_reserved_ports`), so that outgoing
//! connections never take a managed port: the managed range in the host's namespace, and
//! each allocated port in its own namespace when that is another (a container's). What
//! portgate adds is recorded in the store first, so that it gives back exactly that: a
//! namespace's port once no allocation there holds it (after quarantine), and everything
//! on `portgate uninstall`. A namespace that is gone took its reserved ports with it: its
//! record is just forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use super::{
    PortManager,
    error::{PortError, Result},
    owners::NetnsKey,
};
use crate::{
    host::{self, HostError, netns::NetnsError},
    model::{Allocation, NetnsId},
    store::{Change, HostChanges, NetnsReservedPort, Store, StoreError},
    text::Chain,
};

impl NetnsReservedPort {
    /// The namespace it was reserved in, to find again.
    const fn netns_key(&self) -> NetnsKey {
        (self.inode, self.netns.0)
    }
}

impl PortManager {
    /// Warns when the managed range overlaps the kernel's ephemeral ports, and (when
    /// `[ports] reserve_ephemeral` is set) reserves the range there. Returns the warnings.
    ///
    /// The reservation is recorded before it is written: a crash in between leaves a record
    /// of a reservation that may not exist (harmless to give back), never a reservation
    /// without a record.
    pub async fn reserve_ephemeral(&self) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let reserve = self.config.reserve_ephemeral;
        match host::sysctls::local_port_range() {
            Ok(ephemeral) => {
                if let Some((low, high)) = host::sysctls::ephemeral_overlap(self.range(), ephemeral)
                {
                    warnings.push(format!(
                        "the managed range overlaps the kernel's ephemeral ports ({}-{}) at {low}-{high}{}",
                        ephemeral.0,
                        ephemeral.1,
                        if reserve {
                            ": reserved in net.ipv4.ip_local_reserved_ports"
                        } else {
                            ": outgoing connections may take managed ports (set [ports] reserve_ephemeral = true)"
                        }
                    ));
                }
            }
            Err(err) => warnings.push(format!("reading the ephemeral port range: {err}")),
        }
        if !reserve {
            return Ok(warnings);
        }
        let planned = host::sysctls::ports_to_reserve(self.range())
            .map_err(|err| PortError::host("reading net.ipv4.ip_local_reserved_ports", err))?;
        if planned.is_empty() {
            return Ok(warnings);
        }
        let mut record = self.host_changes.lock().await;
        let before = record.clone();
        let mut plan = before.clone();
        plan.reserved_ports_added.extend(planned);
        plan.reserved_ports_added.sort_unstable();
        plan.reserved_ports_added.dedup();
        self.record_host_changes(&mut record, plan).await?;
        if let Err(err) = host::sysctls::reserve_ports(self.range()) {
            // Nothing was written: take the plan out of the record again.
            self.record_host_changes(&mut record, before).await?;
            return Err(PortError::host(
                "adding the range to net.ipv4.ip_local_reserved_ports",
                err,
            ));
        }
        Ok(warnings)
    }

    /// Reserves the port of `held`, an allocation in another namespace than the host's
    /// (opened at `path`), in that namespace's reserved ports, unless it is reserved there
    /// already; recorded before it is written, as [`PortManager::reserve_ephemeral`] does.
    pub(super) async fn reserve_in_netns(&self, held: &Allocation, path: &Path) -> Result<()> {
        let Some(info) = held
            .netns
            .as_ref()
            .filter(|_| self.config.reserve_ephemeral)
        else {
            return Ok(());
        };
        let entry = NetnsReservedPort {
            netns: held.id.netns,
            inode: info.inode,
            port: held.id.port,
        };
        let port = entry.port;
        let mut record = self.host_changes.lock().await;
        // The other protocol's allocation of the same port reserved it: the list is one.
        if record.netns_reserved_ports.contains(&entry) {
            return Ok(());
        }
        let planned = in_netns(path, &info.label, move || {
            host::sysctls::ports_to_reserve(port..=port)
        })
        .await?;
        if planned.is_empty() {
            return Ok(());
        }
        let before = record.clone();
        let mut plan = before.clone();
        plan.netns_reserved_ports.push(entry);
        plan.netns_reserved_ports.sort_unstable();
        self.record_host_changes(&mut record, plan).await?;
        let written = in_netns(path, &info.label, move || {
            host::sysctls::reserve_ports(port..=port)
        })
        .await;
        if let Err(err) = written {
            self.record_host_changes(&mut record, before).await?;
            return Err(err);
        }
        Ok(())
    }

    /// Keeps the record of other namespaces' reserved ports true after a look at the
    /// namespaces `checked`, of which those in `alive` still exist (with a path to each):
    /// the ports of a namespace that is gone are forgotten (they went with it), and a port
    /// that no allocation of its namespace holds any more is given back. A port that cannot
    /// be given back stays recorded, to be tried again (and by `portgate uninstall`).
    pub(super) async fn keep_netns_reservations(
        &self,
        checked: &BTreeSet<NetnsKey>,
        alive: &BTreeMap<NetnsKey, PathBuf>,
    ) -> Result<()> {
        let mut record = self.host_changes.lock().await;
        if record.netns_reserved_ports.is_empty() {
            return Ok(());
        }
        // Under the record's lock: an allocation that finds its port recorded relies on it.
        let held: BTreeSet<(NetnsId, u16)> = {
            let state = self.state.lock().await;
            state
                .allocator
                .allocations()
                .map(|held| (held.id.netns, held.id.port))
                .collect()
        };
        let mut kept = Vec::new();
        let mut unheld: BTreeMap<NetnsKey, Vec<NetnsReservedPort>> = BTreeMap::new();
        for entry in &record.netns_reserved_ports {
            let key = entry.netns_key();
            if checked.contains(&key) && !alive.contains_key(&key) {
                continue;
            }
            if held.contains(&(entry.netns, entry.port)) || !alive.contains_key(&key) {
                kept.push(*entry);
            } else {
                unheld.entry(key).or_default().push(*entry);
            }
        }
        for (key, entries) in unheld {
            let ranges: Vec<(u16, u16)> = entries.iter().map(|e| (e.port, e.port)).collect();
            let label = format!("net:[{}]", key.0);
            let given = in_netns(&alive[&key], &label, move || {
                host::sysctls::unreserve_ports(&ranges)
            })
            .await;
            if let Err(err) = given {
                self.monitor.record_error(super::ErrorSource::Host);
                log::error!(
                    "giving back reserved ports of {label}, tried again later: {}",
                    Chain(&err)
                );
                kept.extend(entries);
            }
        }
        if kept == record.netns_reserved_ports {
            return Ok(());
        }
        let plan = HostChanges {
            netns_reserved_ports: kept,
            ..record.clone()
        };
        self.record_host_changes(&mut record, plan).await
    }

    /// The namespaces other namespaces' reserved ports were recorded in.
    pub(super) async fn reserved_netns(&self) -> BTreeSet<NetnsKey> {
        self.host_changes
            .lock()
            .await
            .netns_reserved_ports
            .iter()
            .map(NetnsReservedPort::netns_key)
            .collect()
    }

    /// Makes `plan` the durable record, then `record` (the one in memory, held locked).
    async fn record_host_changes(&self, record: &mut HostChanges, plan: HostChanges) -> Result<()> {
        self.store
            .submit(vec![Change::SetHostChanges(plan.clone())])
            .wait()
            .await
            .map_err(|err| {
                PortError::state(
                    "the reserved ports could not be recorded",
                    Some(Box::new(err)),
                )
            })?;
        *record = plan;
        Ok(())
    }
}

/// Runs `f` (a sysctl read or write) in the namespace at `path` (`label` names it), on a
/// blocking thread.
async fn in_netns<T: Send + 'static>(
    path: &Path,
    label: &str,
    f: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T> {
    let (path, label) = (path.to_owned(), label.to_owned());
    tokio::task::spawn_blocking(move || match host::netns::enter(&path, f) {
        Ok(done) => done.map_err(|err| {
            PortError::host(
                format!(
                    "the reserved ports (net.ipv4.ip_local_reserved_ports) of the namespace {label}"
                ),
                err,
            )
        }),
        Err(err) => Err(PortError::host(
            format!("entering the namespace {label}"),
            err,
        )),
    })
    .await
    .map_err(|err| PortError::host("changing a namespace's reserved ports", err))?
}

/// Gives back the reserved ports portgate added (as recorded in `store`), in the host's
/// namespace and in every other namespace that still exists, and clears the record (of a
/// namespace that is gone, the record is just forgotten): what `portgate uninstall` does,
/// with no daemon running. What could not be given back stays recorded.
pub fn give_back_reserved_ports(store: &dyn Store) -> Result<(), GiveBackError> {
    let before = store.load()?.host;
    let mut record = before.clone();
    let mut failure = None;
    if !record.reserved_ports_added.is_empty() {
        match host::sysctls::unreserve_ports(&record.reserved_ports_added) {
            Ok(()) => record.reserved_ports_added.clear(),
            Err(err) => failure = Some(GiveBackError::Host(err)),
        }
    }
    let wanted = record
        .netns_reserved_ports
        .iter()
        .map(NetnsReservedPort::netns_key)
        .collect();
    let alive = host::netns::find_all(&wanted);
    let mut kept = Vec::new();
    for key in wanted {
        let entries = record
            .netns_reserved_ports
            .iter()
            .filter(|entry| entry.netns_key() == key);
        let Some(path) = alive.get(&key) else {
            continue;
        };
        let ranges: Vec<(u16, u16)> = entries.clone().map(|e| (e.port, e.port)).collect();
        let given = host::netns::enter(path, || host::sysctls::unreserve_ports(&ranges))
            .map_err(|source| GiveBackError::Netns {
                inode: key.0,
                source,
            })
            .and_then(|done| done.map_err(GiveBackError::Host));
        if let Err(err) = given {
            kept.extend(entries.copied());
            failure.get_or_insert(err);
        }
    }
    record.netns_reserved_ports = kept;
    if record != before {
        store
            .submit(vec![Change::SetHostChanges(record)])
            .wait_blocking()?;
    }
    failure.map_or(Ok(()), Err)
}

/// Why the reserved ports could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum GiveBackError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sysctl could not be read or written.
    #[error(
        "taking portgate's ports out of net.ipv4.ip_local_reserved_ports (run `portgate uninstall` again once fixed)"
    )]
    Host(#[from] HostError),
    /// A namespace that holds ports portgate reserved could not be entered.
    #[error(
        "entering the network namespace net:[{inode}] to give back the ports portgate reserved there (run `portgate uninstall` again as root)"
    )]
    Netns {
        /// The namespace's inode.
        inode: u64,
        /// The cause.
        #[source]
        source: NetnsError,
    },
}
