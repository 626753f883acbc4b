//! The kernel's reserved ports: the managed range is added to
//! `net.ipv4.ip_local_reserved_ports`, so that outgoing connections never take a managed
//! port, and what portgate added is recorded in the store first, so that
//! `portgate uninstall` gives back exactly that.

use super::{
    PortManager,
    error::{PortError, Result},
};
use crate::{
    host,
    store::{Change, HostChanges, Store, StoreError},
};

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
        let before = self.host_changes().reserved_ports_added;
        let mut planned_record = HostChanges {
            reserved_ports_added: before.iter().copied().chain(planned).collect(),
        };
        planned_record.reserved_ports_added.sort_unstable();
        planned_record.reserved_ports_added.dedup();
        self.record_host_changes(planned_record).await?;
        if let Err(err) = host::sysctls::reserve_ports(self.range()) {
            // Nothing was written: take the plan out of the record again.
            self.record_host_changes(HostChanges {
                reserved_ports_added: before,
            })
            .await?;
            return Err(PortError::host(
                "adding the range to net.ipv4.ip_local_reserved_ports",
                err,
            ));
        }
        Ok(warnings)
    }

    fn host_changes(&self) -> HostChanges {
        self.host_changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn record_host_changes(&self, record: HostChanges) -> Result<()> {
        self.store
            .submit(vec![Change::SetHostChanges(record.clone())])
            .wait()
            .await
            .map_err(|err| {
                PortError::state(
                    "the reserved ports could not be recorded",
                    Some(Box::new(err)),
                )
            })?;
        *self
            .host_changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = record;
        Ok(())
    }
}

/// Gives back the reserved ports portgate added (as recorded in `store`) and clears the
/// record: what `portgate uninstall` does, with no daemon running.
pub fn give_back_reserved_ports(store: &dyn Store) -> Result<(), GiveBackError> {
    let mut record = store.load()?.host;
    if record.reserved_ports_added.is_empty() {
        return Ok(());
    }
    host::sysctls::unreserve_ports(&record.reserved_ports_added)?;
    record.reserved_ports_added.clear();
    store
        .submit(vec![Change::SetHostChanges(record)])
        .wait_blocking()?;
    Ok(())
}

/// Why the reserved ports could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum GiveBackError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sysctl could not be read or written.
    #[error("taking the range out of net.ipv4.ip_local_reserved_ports")]
    Host(#[from] host::HostError),
}
