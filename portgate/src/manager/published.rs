//! Published ports whose connections reach the container through a userland proxy (as
//! docker's `docker-proxy` or rootless podman's `rootlessport` do) instead of a DNAT: the
//! container then sees the proxy's address as every connection's source, so its allowlist
//! judges the proxy, not the clients. A process listening on the host port in the host's
//! namespace is the sign of one; `status` and `check` say so.

use std::ops::RangeInclusive;

use super::PortManager;
use crate::model::{Allocation, PortId, PortStatus};

impl PortManager {
    /// A warning for each Active published port whose host port has a listener in the
    /// host's namespace.
    pub async fn proxy_warnings(&self) -> Vec<String> {
        let published: Vec<Allocation> = self
            .state
            .lock()
            .await
            .allocator
            .allocations()
            .filter(|held| held.published.is_some() && held.status == PortStatus::Active)
            .cloned()
            .collect();
        let mut warnings = Vec::new();
        for held in published {
            if let Some(warning) = self.proxy_warning(&held).await {
                warnings.push(warning);
            }
        }
        warnings
    }

    /// The proxy warning of the allocation of `id`, if it is published through one.
    pub async fn proxy_warning_of(&self, id: PortId) -> Option<String> {
        let held = self.allocation(id).await?;
        self.proxy_warning(&held).await
    }

    async fn proxy_warning(&self, held: &Allocation) -> Option<String> {
        let host_port = held.published?;
        let sockets = std::sync::Arc::clone(&self.sockets);
        let protocol = held.id.protocol;
        let range: RangeInclusive<u16> = host_port..=host_port;
        let listeners = tokio::task::spawn_blocking(move || sockets.listeners(protocol, range))
            .await
            .ok()?
            .ok()?;
        let listener = listeners.first()?;
        let label = held
            .netns
            .as_ref()
            .map_or("the host", |netns| netns.label.as_str());
        Some(format!(
            "{} in {label} is published on host port {host_port}, where a process of uid {} listens (socket inode {}): a userland proxy forwards its connections, so the container sees the proxy's address and the allowlist judges the proxy, not the clients. Turn the proxy off (docker: \"userland-proxy\": false in daemon.json) so that the runtime's DNAT forwards the clients' own addresses",
            held.id, listener.uid, listener.inode
        ))
    }
}
