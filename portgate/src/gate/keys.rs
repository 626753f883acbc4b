//! How the model's records are written in the kernel maps: keys, addresses and the policy
//! record.

use std::net::IpAddr;

use ipnet::IpNet;
use portgate_common::{AddrKey, AllowKey, Policy, PortKey, family, policy_flags};

use crate::model::{NetnsId, PortId, PortPolicy, Protocol};

/// The policy and slot key of a port.
pub(super) const fn port_key(id: PortId) -> PortKey {
    PortKey::new(id.netns.0, id.port, id.protocol.number())
}

/// The port of a kernel key; `None` for a protocol portgate does not manage.
pub(super) fn port_of(key: &PortKey) -> Option<PortId> {
    Protocol::from_number(key.proto).map(|protocol| PortId {
        netns: NetnsId(key.netns),
        port: key.port,
        protocol,
    })
}

/// The address bytes and family of `addr` as the kernel keys store them.
pub(super) fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (family::V4, bytes)
        }
        IpAddr::V6(v6) => (family::V6, v6.octets()),
    }
}

/// The address stored in a key's bytes.
pub(super) fn addr_from_bytes(family_code: u8, bytes: [u8; 16]) -> IpAddr {
    if family_code == family::V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// The grants-map key of `addr` on a port.
pub(super) fn addr_key(id: PortId, addr: IpAddr) -> AddrKey {
    let (family, addr) = addr_bytes(addr);
    AddrKey {
        netns: id.netns.0,
        port: id.port,
        proto: id.protocol.number(),
        family,
        _pad: [0; 4],
        addr,
    }
}

/// The LPM prefix length and key data of an allowlist prefix in its port's trie, in
/// `generation` (0 or 1) of the port's allowlist.
pub(super) fn allow_key(generation: u8, prefix: IpNet) -> (u32, AllowKey) {
    let prefix = prefix.trunc();
    let (family, addr) = addr_bytes(prefix.addr());
    (
        AllowKey::PREFIX_BITS + u32::from(prefix.prefix_len()),
        AllowKey {
            generation,
            family,
            _pad: [0; 2],
            addr,
        },
    )
}

/// The generation (0 or 1) and prefix a trie key holds; `None` for a key this build would
/// not write.
pub(super) fn prefix_of(prefix_len: u32, data: &AllowKey) -> Option<(usize, IpNet)> {
    let bits = u8::try_from(prefix_len.checked_sub(AllowKey::PREFIX_BITS)?).ok()?;
    let prefix = IpNet::new(addr_from_bytes(data.family, data.addr), bits).ok()?;
    (data.generation < 2).then_some((usize::from(data.generation), prefix))
}

/// The generation of a port's allowlist that a policy record puts in force.
pub(super) const fn allowlist_generation(record: &Policy) -> u8 {
    if record.flags & policy_flags::ALLOW_GENERATION == 0 {
        0
    } else {
        1
    }
}

/// The kernel record of the policy of port `id`, with allowlist `allowlist` (0 or 1) in
/// force, under `generation` ([`Policy::generation`]); `None` when its status is Available.
pub(super) fn policy_record(
    id: PortId,
    policy: &PortPolicy,
    allowlist: u8,
    generation: u32,
) -> Option<Policy> {
    let status = policy.status.code()?;
    let mut flags = 0;
    if !policy.access.allowed_ips.is_empty() {
        flags |= policy_flags::ALLOWLIST;
    }
    if policy.access.require_authentication {
        flags |= policy_flags::REQUIRE_AUTH;
    }
    if allowlist != 0 {
        flags |= policy_flags::ALLOW_GENERATION;
    }
    let (owner_cgroup, owner_level) = match &policy.owner {
        Some(owner) => {
            flags |= policy_flags::OWNER;
            (owner.id, owner.level)
        }
        None => (0, 0),
    };
    Some(Policy {
        epoch: policy.epoch,
        status,
        flags,
        max_connections: policy.access.max_connections,
        owner_level,
        published_port: policy.published.unwrap_or(0),
        _pad: 0,
        generation,
        // The port's trie, which the caller fills in.
        allowlist: 0,
        owner_cgroup,
        home: port_key(id),
    })
}

/// The record of the host side of a published port: a copy of its allocation's `record`
/// that points home to it. Binds of the host port are not the owner's to make: a container
/// runtime's proxy may hold it.
pub(super) const fn published_record(record: &Policy) -> Policy {
    let mut published = *record;
    published.flags &= !policy_flags::OWNER;
    published.owner_cgroup = 0;
    published.owner_level = 0;
    published.published_port = 0;
    published
}

/// The key of the host side of `id` published on host port `port`.
pub(super) const fn published_key(id: PortId, port: u16) -> PortKey {
    PortKey::new(NetnsId::HOST.0, port, id.protocol.number())
}
