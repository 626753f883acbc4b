//! Published ports whose connections reach the container through a userland proxy (as
//! docker's `docker-proxy` or rootless podman's `rootlessport` do) instead of a DNAT: the
//! container then sees the proxy's address as every connection's source, so its allowlist
//! judges the proxy, not the clients. A process listening on the host port in the host's
//! namespace is the sign of one; `status` and `check` say so.

use std::ops::RangeInclusive;

use super::PortManager;
use crate::{
    host::sockets::Listener,
    model::{Allocation, PortId, PortStatus, Protocol},
};

impl PortManager {
    /// A warning for each Active published port whose host port has a listener in the
    /// host's namespace: one read of the socket tables per protocol, over the range the
    /// host ports span.
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
        self.proxied(published).await
    }

    /// The proxy warning of the allocation of `id`, if it is published through one.
    pub async fn proxy_warning_of(&self, id: PortId) -> Option<String> {
        let held = self.allocation(id).await?;
        self.proxied(vec![held]).await.pop()
    }

    /// The warnings of those of `published` whose host port has a listener.
    async fn proxied(&self, published: Vec<Allocation>) -> Vec<String> {
        let mut warnings = Vec::new();
        for protocol in Protocol::ALL {
            let held: Vec<&Allocation> = published
                .iter()
                .filter(|held| held.id.protocol == protocol)
                .collect();
            let ports = held.iter().filter_map(|held| held.published);
            let (Some(low), Some(high)) = (ports.clone().min(), ports.max()) else {
                continue;
            };
            let sockets = std::sync::Arc::clone(&self.sockets);
            let range: RangeInclusive<u16> = low..=high;
            let Ok(Ok(listeners)) =
                tokio::task::spawn_blocking(move || sockets.listeners(protocol, range)).await
            else {
                continue;
            };
            for held in held {
                let Some(listener) = listeners
                    .iter()
                    .find(|listener| Some(listener.port) == held.published)
                else {
                    continue;
                };
                warnings.push(warning(held, listener));
            }
        }
        warnings
    }
}

/// What `status` and `check` say of `held`, published through the proxy holding `listener`.
fn warning(held: &Allocation, listener: &Listener) -> String {
    let label = held
        .netns
        .as_ref()
        .map_or("the host", |netns| netns.label.as_str());
    format!(
        "{} in {label} is published on host port {}, where a process of uid {} listens (socket inode {}): a userland proxy forwards its connections, so the container sees the proxy's address and the allowlist judges the proxy, not the clients. Turn the proxy off (docker: \"userland-proxy\": false in daemon.json) so that the runtime's DNAT forwards the clients' own addresses",
        held.id, listener.port, listener.uid, listener.inode
    )
}
