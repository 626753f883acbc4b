//! The packet verdict in plain Rust: what the kernel programs decide, written again
//! independently so that tests can hold the two to each other, and so that userspace can
//! answer "would this source get in?" (the manager's `validate_connection`).
//!
//! First match wins (DESIGN.md): unallocated, draining, not allowed, authentication
//! required, connection limit, otherwise accepted. Ports outside the managed range are
//! untouched.

use std::{collections::HashMap, net::IpAddr};

use crate::policy::{DropReason, PortPolicy, PortStatus, Protocol};

/// What the verdict needs to know about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
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
            protocol: Protocol::Udp,
            source,
            dport,
            new_connection: true,
        }
    }
}

/// The verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Outside the managed range: passes, not counted.
    Untouched,
    /// Passes (not a new connection).
    Pass,
    /// A new connection passes and is counted as accepted.
    Accept,
    /// Dropped for this reason.
    Drop(DropReason),
}

impl Decision {
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
    /// The policy of (port, protocol), `None` when unallocated.
    fn policy(&self, port: u16, protocol: Protocol) -> Option<&PortPolicy>;
    /// Expiry (`CLOCK_MONOTONIC` ns) of the grant of `source` on (port, protocol).
    fn grant_expiry(&self, port: u16, protocol: Protocol, source: IpAddr) -> Option<u64>;
    /// Connection slots the TCP port holds (established plus handshakes in flight).
    fn slots(&self, port: u16) -> u64;
}

/// The verdict for `packet` at `now_ns` (`CLOCK_MONOTONIC`).
#[must_use]
pub fn evaluate(view: &impl GateView, packet: &Packet, now_ns: u64) -> Decision {
    match view.managed_range() {
        Some((min, max)) if (min..=max).contains(&packet.dport) => {}
        _ => return Decision::Untouched,
    }
    let Some(policy) = view.policy(packet.dport, packet.protocol) else {
        return if packet.new_connection {
            Decision::Drop(DropReason::Unallocated)
        } else {
            Decision::Pass
        };
    };
    if packet.new_connection && policy.status != PortStatus::Active {
        return Decision::Drop(DropReason::Draining);
    }
    // A linear scan: the kernel keeps the same prefixes in an LPM trie.
    if !policy.allow.is_empty() && !policy.allow.covers(packet.source) {
        return Decision::Drop(DropReason::NotAllowed);
    }
    if !packet.new_connection {
        return Decision::Pass;
    }
    let granted = view
        .grant_expiry(packet.dport, packet.protocol, packet.source)
        .is_some_and(|expires| now_ns < expires);
    if policy.require_authentication && !granted {
        return Decision::Drop(DropReason::AuthRequired);
    }
    if packet.protocol == Protocol::Tcp
        && policy.max_connections != 0
        && view.slots(packet.dport) >= u64::from(policy.max_connections)
    {
        return Decision::Drop(DropReason::ConnLimit);
    }
    Decision::Accept
}

/// An in-memory [`GateView`]: what the tests mirror the kernel maps into, and what the
/// manager evaluates against when it runs without the kernel gate.
#[derive(Clone, Debug, Default)]
pub struct GateModel {
    range: Option<(u16, u16)>,
    policies: HashMap<(u16, Protocol), PortPolicy>,
    grants: HashMap<(u16, Protocol, IpAddr), u64>,
    slots: HashMap<u16, u64>,
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

    /// Sets the policy of (port, protocol).
    pub fn set_policy(&mut self, port: u16, protocol: Protocol, policy: PortPolicy) {
        self.policies.insert((port, protocol), policy);
    }

    /// Removes the policy of (port, protocol) and its grants.
    pub fn remove_policy(&mut self, port: u16, protocol: Protocol) {
        self.policies.remove(&(port, protocol));
        self.grants.retain(|&(grant_port, grant_protocol, _), _| {
            (grant_port, grant_protocol) != (port, protocol)
        });
    }

    /// Grants `source` on (port, protocol) until `expires_ns`.
    pub fn add_grant(&mut self, port: u16, protocol: Protocol, source: IpAddr, expires_ns: u64) {
        self.grants.insert((port, protocol, source), expires_ns);
    }

    /// How many grants (port, protocol) holds, expired or not.
    #[must_use]
    pub fn grant_count(&self, port: u16, protocol: Protocol) -> usize {
        self.grants
            .keys()
            .filter(|&&(grant_port, grant_protocol, _)| {
                (grant_port, grant_protocol) == (port, protocol)
            })
            .count()
    }

    /// Withdraws a grant.
    pub fn remove_grant(&mut self, port: u16, protocol: Protocol, source: IpAddr) {
        self.grants.remove(&(port, protocol, source));
    }

    /// One more connection slot taken on a TCP port.
    pub fn add_slot(&mut self, port: u16) {
        *self.slots.entry(port).or_default() += 1;
    }

    /// Sets the slots a TCP port holds.
    pub fn set_slots(&mut self, port: u16, slots: u64) {
        self.slots.insert(port, slots);
    }
}

impl GateView for GateModel {
    fn managed_range(&self) -> Option<(u16, u16)> {
        self.range
    }

    fn policy(&self, port: u16, protocol: Protocol) -> Option<&PortPolicy> {
        self.policies.get(&(port, protocol))
    }

    fn grant_expiry(&self, port: u16, protocol: Protocol, source: IpAddr) -> Option<u64> {
        self.grants.get(&(port, protocol, source)).copied()
    }

    fn slots(&self, port: u16) -> u64 {
        self.slots.get(&port).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const PORT: u16 = 20_000;
    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));

    fn model(policy: PortPolicy) -> GateModel {
        let mut model = GateModel::new(PORT, PORT + 9);
        model.set_policy(PORT, Protocol::Tcp, policy);
        model
    }

    fn syn(source: IpAddr) -> Packet {
        Packet::tcp(source, PORT, true, false)
    }

    #[test]
    fn outside_the_range_is_untouched() {
        let model = GateModel::new(PORT, PORT + 9);
        for port in [PORT - 1, PORT + 10] {
            let packet = Packet::tcp(V4, port, true, false);
            assert_eq!(evaluate(&model, &packet, 0), Decision::Untouched);
        }
    }

    #[test]
    fn unallocated_drops_new_connections_only() {
        let model = GateModel::new(PORT, PORT + 9);
        assert_eq!(
            evaluate(&model, &syn(V4), 0),
            Decision::Drop(DropReason::Unallocated)
        );
        assert_eq!(
            evaluate(&model, &Packet::udp(V4, PORT), 0),
            Decision::Drop(DropReason::Unallocated)
        );
        let ack = Packet::tcp(V4, PORT, false, true);
        assert_eq!(evaluate(&model, &ack, 0), Decision::Pass);
        let syn_ack = Packet::tcp(V4, PORT, true, true);
        assert_eq!(evaluate(&model, &syn_ack, 0), Decision::Pass);
    }

    #[test]
    fn draining_comes_before_the_allowlist_and_spares_established_traffic() {
        for status in [PortStatus::Draining, PortStatus::Closed] {
            let model = model(PortPolicy {
                status,
                allow: ["10.0.0.0/8".parse().expect("prefix")]
                    .into_iter()
                    .collect(),
                ..PortPolicy::default()
            });
            assert_eq!(
                evaluate(&model, &syn(V4), 0),
                Decision::Drop(DropReason::Draining)
            );
            // An established packet from outside the allowlist is still not allowed.
            let ack = Packet::tcp(V4, PORT, false, true);
            assert_eq!(
                evaluate(&model, &ack, 0),
                Decision::Drop(DropReason::NotAllowed)
            );
        }
    }

    #[test]
    fn allowlist_matches_by_family_and_prefix() {
        let model = model(PortPolicy {
            allow: [
                "198.18.0.0/31".parse().expect("prefix"),
                "fd00::/16".parse().expect("prefix"),
            ]
            .into_iter()
            .collect(),
            ..PortPolicy::default()
        });
        assert_eq!(evaluate(&model, &syn(V4), 0), Decision::Accept);
        assert_eq!(evaluate(&model, &syn(V6), 0), Decision::Accept);
        let outside = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(
            evaluate(&model, &syn(outside), 0),
            Decision::Drop(DropReason::NotAllowed)
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        assert_eq!(
            evaluate(&model, &syn(mapped), 0),
            Decision::Drop(DropReason::NotAllowed),
            "an IPv4 prefix does not match an IPv6 source"
        );
    }

    #[test]
    fn zero_length_prefixes_match_their_whole_family() {
        let model = model(PortPolicy {
            allow: ["0.0.0.0/0".parse().expect("prefix")].into_iter().collect(),
            ..PortPolicy::default()
        });
        assert_eq!(evaluate(&model, &syn(V4), 0), Decision::Accept);
        assert_eq!(
            evaluate(&model, &syn(V6), 0),
            Decision::Drop(DropReason::NotAllowed)
        );
    }

    #[test]
    fn grants_expire_at_their_instant() {
        let mut model = model(PortPolicy {
            require_authentication: true,
            ..PortPolicy::default()
        });
        assert_eq!(
            evaluate(&model, &syn(V4), 10),
            Decision::Drop(DropReason::AuthRequired)
        );
        model.add_grant(PORT, Protocol::Tcp, V4, 100);
        assert_eq!(evaluate(&model, &syn(V4), 99), Decision::Accept);
        assert_eq!(
            evaluate(&model, &syn(V4), 100),
            Decision::Drop(DropReason::AuthRequired)
        );
        let ack = Packet::tcp(V4, PORT, false, true);
        assert_eq!(evaluate(&model, &ack, 1_000), Decision::Pass);
    }

    #[test]
    fn connection_limit_counts_slots_for_tcp_only() {
        let mut model = model(PortPolicy {
            max_connections: 2,
            ..PortPolicy::default()
        });
        model.set_policy(
            PORT,
            Protocol::Udp,
            PortPolicy {
                max_connections: 2,
                ..PortPolicy::default()
            },
        );
        model.set_slots(PORT, 1);
        assert_eq!(evaluate(&model, &syn(V4), 0), Decision::Accept);
        model.add_slot(PORT);
        assert_eq!(
            evaluate(&model, &syn(V4), 0),
            Decision::Drop(DropReason::ConnLimit)
        );
        assert_eq!(
            evaluate(&model, &Packet::udp(V4, PORT), 0),
            Decision::Accept
        );
    }

    #[test]
    fn authentication_comes_before_the_limit() {
        let mut model = model(PortPolicy {
            max_connections: 1,
            require_authentication: true,
            ..PortPolicy::default()
        });
        model.set_slots(PORT, 1);
        assert_eq!(
            evaluate(&model, &syn(V4), 0),
            Decision::Drop(DropReason::AuthRequired)
        );
    }
}
