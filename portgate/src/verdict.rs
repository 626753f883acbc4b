//! The packet verdict in plain Rust: what the kernel programs decide, written again
//! independently so that tests can hold the two to each other, and so that userspace can
//! answer "would this source get in?" (the manager's `validate_connection`).
//!
//! The kernel and this module speak of the same things with the same words: [`decide`]
//! gives a [`Verdict`]. First match wins (DESIGN.md): unallocated, draining, not allowed,
//! authentication required, connection limit, otherwise accepted. Ports outside the
//! managed range are untouched, except another namespace's ports while allocated there (the
//! range is the host's). A published port's host side is judged as the allocation it
//! forwards to: its policy, grants and slots.

use std::{collections::HashMap, net::IpAddr};

use crate::model::{DropReason, NetnsId, PortId, PortPolicy, PortStatus, Protocol};

/// What the verdict needs to know about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The namespace it is for (as the hook that sees it tells).
    pub netns: NetnsId,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Source address.
    pub source: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// A TCP SYN without ACK, or any UDP datagram.
    pub new_connection: bool,
}

impl Packet {
    /// A TCP segment with the given SYN and ACK flags.
    #[must_use]
    pub const fn tcp(source: IpAddr, dport: u16, syn: bool, ack: bool) -> Self {
        Self {
            netns: NetnsId::HOST,
            protocol: Protocol::Tcp,
            source,
            dport,
            new_connection: syn && !ack,
        }
    }

    /// A UDP datagram: every one counts as a new connection.
    #[must_use]
    pub const fn udp(source: IpAddr, dport: u16) -> Self {
        Self {
            netns: NetnsId::HOST,
            protocol: Protocol::Udp,
            source,
            dport,
            new_connection: true,
        }
    }

    /// A new connection from `source` to `id`: a TCP SYN, or a UDP datagram.
    #[must_use]
    pub const fn new_connection(id: PortId, source: IpAddr) -> Self {
        let mut packet = match id.protocol {
            Protocol::Tcp => Self::tcp(source, id.port, true, false),
            Protocol::Udp => Self::udp(source, id.port),
        };
        packet.netns = id.netns;
        packet
    }

    /// The port it is for, as the hook sees it.
    #[must_use]
    pub const fn port(&self) -> PortId {
        PortId {
            netns: self.netns,
            port: self.dport,
            protocol: self.protocol,
        }
    }
}

/// The verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Outside the managed range: passes, not counted.
    Untouched,
    /// Passes (not a new connection).
    Pass,
    /// A new connection passes and is counted as accepted.
    Accept,
    /// Dropped for this reason.
    Drop(DropReason),
}

impl Verdict {
    /// Whether the packet gets through.
    #[must_use]
    pub const fn passes(self) -> bool {
        !matches!(self, Self::Drop(_))
    }
}

/// The state a verdict reads: the kernel maps, or a model of them.
pub trait GateView {
    /// The managed range, `None` when nothing is managed.
    fn managed_range(&self) -> Option<(u16, u16)>;
    /// The allocation a port belongs to (itself, or the one a published host port forwards
    /// to) and its policy; `None` when unallocated.
    fn policy(&self, id: PortId) -> Option<(PortId, &PortPolicy)>;
    /// Expiry (`CLOCK_MONOTONIC` ns) of the grant of `source` on a port.
    fn grant_expiry(&self, id: PortId, source: IpAddr) -> Option<u64>;
    /// Connection slots a TCP port holds (established plus handshakes in flight).
    fn slots(&self, id: PortId) -> u64;
}

/// The verdict on `packet` at `now_ns` (`CLOCK_MONOTONIC`).
#[must_use]
pub fn decide(view: &impl GateView, packet: &Packet, now_ns: u64) -> Verdict {
    let in_range = view
        .managed_range()
        .is_some_and(|(min, max)| (min..=max).contains(&packet.dport));
    if !in_range && packet.netns.is_host() {
        return Verdict::Untouched;
    }
    let Some((id, policy)) = view.policy(packet.port()) else {
        if !in_range {
            return Verdict::Untouched;
        }
        return if packet.new_connection {
            Verdict::Drop(DropReason::Unallocated)
        } else {
            Verdict::Pass
        };
    };
    if packet.new_connection && policy.status != PortStatus::Active {
        return Verdict::Drop(DropReason::Draining);
    }
    let access = &policy.access;
    if !access.allowed_ips.is_empty() && !access.allowed_ips.covers(packet.source) {
        return Verdict::Drop(DropReason::NotAllowed);
    }
    if !packet.new_connection {
        return Verdict::Pass;
    }
    let granted = view
        .grant_expiry(id, packet.source)
        .is_some_and(|expires| now_ns < expires);
    if access.require_authentication && !granted {
        return Verdict::Drop(DropReason::AuthRequired);
    }
    if packet.protocol == Protocol::Tcp
        && access.max_connections != 0
        && view.slots(id) >= u64::from(access.max_connections)
    {
        return Verdict::Drop(DropReason::ConnLimit);
    }
    Verdict::Accept
}

/// An in-memory [`GateView`]: what the tests mirror the kernel maps into, and what the
/// manager decides against when it runs without the kernel gate.
#[derive(Clone, Debug, Default)]
pub struct GateModel {
    range: Option<(u16, u16)>,
    policies: HashMap<PortId, PortPolicy>,
    /// Host sides of published ports, with the allocation each forwards to.
    published: HashMap<PortId, PortId>,
    grants: HashMap<(PortId, IpAddr), u64>,
    /// Slots per TCP port, with the policy epoch they were counted under: as in the
    /// kernel, they count only while the port's policy has that epoch.
    slots: HashMap<PortId, (u32, u64)>,
}

impl GateModel {
    /// A model managing `min..=max`.
    #[must_use]
    pub fn new(min: u16, max: u16) -> Self {
        Self {
            range: Some((min, max)),
            ..Self::default()
        }
    }

    /// Sets the policy of a port (and of the host port it is published on).
    pub fn set_policy(&mut self, id: PortId, policy: PortPolicy) {
        self.published.retain(|_, home| *home != id);
        if let Some(port) = policy.published {
            self.published.insert(PortId::new(port, id.protocol), id);
        }
        self.policies.insert(id, policy);
    }

    /// Removes the policy of a port (and of its host port), its grants and its slots (the
    /// kernel removes its slot row with its policy).
    pub fn remove_policy(&mut self, id: PortId) {
        self.policies.remove(&id);
        self.slots.remove(&id);
        self.published.retain(|_, home| *home != id);
        self.grants.retain(|&(granted, _), _| granted != id);
    }

    /// Grants `source` on a port until `expires_ns`.
    pub fn add_grant(&mut self, id: PortId, source: IpAddr, expires_ns: u64) {
        self.grants.insert((id, source), expires_ns);
    }

    /// How many grants a port holds, expired or not.
    #[must_use]
    pub fn grant_count(&self, id: PortId) -> usize {
        self.grants
            .keys()
            .filter(|&&(granted, _)| granted == id)
            .count()
    }

    /// The grants of a port: each source with its expiry (`CLOCK_MONOTONIC` ns), in
    /// address order.
    #[must_use]
    pub fn grants_of(&self, id: PortId) -> Vec<(IpAddr, u64)> {
        let mut grants: Vec<(IpAddr, u64)> = self
            .grants
            .iter()
            .filter(|((granted, _), _)| *granted == id)
            .map(|((_, source), expires)| (*source, *expires))
            .collect();
        grants.sort_unstable();
        grants
    }

    /// Withdraws a grant.
    pub fn remove_grant(&mut self, id: PortId, source: IpAddr) {
        self.grants.remove(&(id, source));
    }

    fn epoch(&self, id: PortId) -> u32 {
        self.policies.get(&id).map_or(0, |policy| policy.epoch)
    }

    /// One more connection slot taken on a TCP port, under its policy's epoch (slots of an
    /// earlier epoch are forgotten, as the kernel does).
    pub fn add_slot(&mut self, id: PortId) {
        let count = self.slots(id);
        self.slots.insert(id, (self.epoch(id), count + 1));
    }

    /// Sets the slots a TCP port holds under its policy's epoch.
    pub fn set_slots(&mut self, id: PortId, slots: u64) {
        self.slots.insert(id, (self.epoch(id), slots));
    }
}

impl GateView for GateModel {
    fn managed_range(&self) -> Option<(u16, u16)> {
        self.range
    }

    fn policy(&self, id: PortId) -> Option<(PortId, &PortPolicy)> {
        let home = self.published.get(&id).copied().unwrap_or(id);
        self.policies.get(&home).map(|policy| (home, policy))
    }

    fn grant_expiry(&self, id: PortId, source: IpAddr) -> Option<u64> {
        self.grants.get(&(id, source)).copied()
    }

    fn slots(&self, id: PortId) -> u64 {
        match self.slots.get(&id) {
            Some(&(epoch, count)) if epoch == self.epoch(id) => count,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::model::PortAccessControl;

    const PORT: u16 = 20_000;
    const ID: PortId = PortId::new(PORT, Protocol::Tcp);
    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));

    fn model(policy: PortPolicy) -> GateModel {
        let mut model = GateModel::new(PORT, PORT + 9);
        model.set_policy(ID, policy);
        model
    }

    fn allowing(prefixes: &[&str]) -> PortAccessControl {
        PortAccessControl {
            allowed_ips: prefixes
                .iter()
                .map(|p| p.parse().expect("prefix"))
                .collect(),
            ..PortAccessControl::default()
        }
    }

    fn limited(max_connections: u32, require_authentication: bool) -> PortPolicy {
        PortPolicy {
            access: PortAccessControl {
                max_connections,
                require_authentication,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        }
    }

    fn syn(source: IpAddr) -> Packet {
        Packet::tcp(source, PORT, true, false)
    }

    #[test]
    fn outside_the_range_is_untouched() {
        let model = GateModel::new(PORT, PORT + 9);
        for port in [PORT - 1, PORT + 10] {
            let packet = Packet::tcp(V4, port, true, false);
            assert_eq!(decide(&model, &packet, 0), Verdict::Untouched);
        }
    }

    #[test]
    fn unallocated_drops_new_connections_only() {
        let model = GateModel::new(PORT, PORT + 9);
        assert_eq!(
            decide(&model, &syn(V4), 0),
            Verdict::Drop(DropReason::Unallocated)
        );
        assert_eq!(
            decide(&model, &Packet::udp(V4, PORT), 0),
            Verdict::Drop(DropReason::Unallocated)
        );
        let ack = Packet::tcp(V4, PORT, false, true);
        assert_eq!(decide(&model, &ack, 0), Verdict::Pass);
        let syn_ack = Packet::tcp(V4, PORT, true, true);
        assert_eq!(decide(&model, &syn_ack, 0), Verdict::Pass);
    }

    #[test]
    fn draining_comes_before_the_allowlist_and_spares_established_traffic() {
        for status in [PortStatus::Draining, PortStatus::Closed] {
            let model = model(PortPolicy {
                status,
                access: allowing(&["10.0.0.0/8"]),
                ..PortPolicy::default()
            });
            assert_eq!(
                decide(&model, &syn(V4), 0),
                Verdict::Drop(DropReason::Draining)
            );
            // An established packet from outside the allowlist is still not allowed.
            let ack = Packet::tcp(V4, PORT, false, true);
            assert_eq!(
                decide(&model, &ack, 0),
                Verdict::Drop(DropReason::NotAllowed)
            );
        }
    }

    #[test]
    fn allowlist_matches_by_family_and_prefix() {
        let model = model(PortPolicy {
            access: allowing(&["198.18.0.0/31", "fd00::/16"]),
            ..PortPolicy::default()
        });
        assert_eq!(decide(&model, &syn(V4), 0), Verdict::Accept);
        assert_eq!(decide(&model, &syn(V6), 0), Verdict::Accept);
        let outside = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(
            decide(&model, &syn(outside), 0),
            Verdict::Drop(DropReason::NotAllowed)
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        assert_eq!(
            decide(&model, &syn(mapped), 0),
            Verdict::Drop(DropReason::NotAllowed),
            "an IPv4 prefix does not match an IPv6 source"
        );
    }

    #[test]
    fn zero_length_prefixes_match_their_whole_family() {
        let model = model(PortPolicy {
            access: allowing(&["0.0.0.0/0"]),
            ..PortPolicy::default()
        });
        assert_eq!(decide(&model, &syn(V4), 0), Verdict::Accept);
        assert_eq!(
            decide(&model, &syn(V6), 0),
            Verdict::Drop(DropReason::NotAllowed)
        );
    }

    #[test]
    fn grants_expire_at_their_instant() {
        let mut model = model(limited(0, true));
        assert_eq!(
            decide(&model, &syn(V4), 10),
            Verdict::Drop(DropReason::AuthRequired)
        );
        model.add_grant(ID, V4, 100);
        assert_eq!(decide(&model, &syn(V4), 99), Verdict::Accept);
        assert_eq!(
            decide(&model, &syn(V4), 100),
            Verdict::Drop(DropReason::AuthRequired)
        );
        let ack = Packet::tcp(V4, PORT, false, true);
        assert_eq!(decide(&model, &ack, 1_000), Verdict::Pass);
    }

    #[test]
    fn connection_limit_counts_slots_for_tcp_only() {
        let mut model = model(limited(2, false));
        model.set_policy(PortId::new(PORT, Protocol::Udp), limited(2, false));
        model.set_slots(ID, 1);
        assert_eq!(decide(&model, &syn(V4), 0), Verdict::Accept);
        model.add_slot(ID);
        assert_eq!(
            decide(&model, &syn(V4), 0),
            Verdict::Drop(DropReason::ConnLimit)
        );
        assert_eq!(decide(&model, &Packet::udp(V4, PORT), 0), Verdict::Accept);
    }

    #[test]
    fn authentication_comes_before_the_limit() {
        let mut model = model(limited(1, true));
        model.set_slots(ID, 1);
        assert_eq!(
            decide(&model, &syn(V4), 0),
            Verdict::Drop(DropReason::AuthRequired)
        );
    }
}
