//! Allowlist changes seen whole (issue #10 item 6, issue #12): a packet is judged by the old
//! policy or by the new one, never by the new allowlist with the old record; the old
//! generation of prefixes is gone from the port's trie after a change, leftovers of a
//! change cut short never come in force, every write gives the record a new generation,
//! and a record whose trie is missing admits nobody.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::Barrier,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashOfMaps, LpmTrie, MapData, MapError, lpm_trie::Key};
use aya_obj::generated::BPF_F_NO_PREALLOC;
use ipnet::IpNet;
use portgate::{
    gate::{Gate, PacketHook},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{AllowKey, PortKey, map_names, policy_flags, reason};
use portgate_tests::{
    common::{
        PinDir, allowing, allowlist,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, tcp_syn},
    },
    require_privileges,
};

/// The allowlists map, one trie per port.
type Tries<'a> = HashOfMaps<&'a MapData, PortKey, LpmTrie<MapData, AllowKey, u32>>;

/// The key of a host TCP port in the allowlists map.
fn tcp_key(port: u16) -> PortKey {
    PortKey::new(
        portgate_common::HOST_NETNS,
        port,
        portgate_common::proto::TCP,
    )
}

/// Every entry of the trie of TCP `port`: (generation, prefix); empty without a trie.
fn port_entries(gate: &mut Gate, port: u16) -> BTreeSet<(u8, IpNet)> {
    let map = gate
        .ebpf_mut()
        .map(map_names::ALLOW)
        .expect("the allowlist map");
    let tries: Tries<'_> = HashOfMaps::try_from(map).expect("a hash of maps");
    let trie = match tries.get(&tcp_key(port), 0) {
        Ok(trie) => trie,
        Err(MapError::KeyNotFound) => return BTreeSet::new(),
        Err(err) => panic!("reading the trie of port {port}: {err}"),
    };
    trie.keys()
        .map(|key| {
            let key = key.expect("a key");
            let data = key.data();
            let addr = if data.family == portgate_common::family::V4 {
                IpAddr::from([data.addr[0], data.addr[1], data.addr[2], data.addr[3]])
            } else {
                IpAddr::from(data.addr)
            };
            let bits = u8::try_from(key.prefix_len() - AllowKey::PREFIX_BITS).expect("bits");
            (data.generation, IpNet::new(addr, bits).expect("prefix"))
        })
        .collect()
}

/// Whether TCP `port` has a trie in the allowlists map.
fn has_trie(gate: &mut Gate, port: u16) -> bool {
    let map = gate
        .ebpf_mut()
        .map(map_names::ALLOW)
        .expect("the allowlist map");
    let tries: Tries<'_> = HashOfMaps::try_from(map).expect("a hash of maps");
    tries.keys().any(|key| key.expect("a key") == tcp_key(port))
}

/// Writes an IPv4 prefix straight into the trie of `port` under `generation` (making the
/// trie if need be), as a change cut short by a crash would have left it.
fn plant(gate: &mut Gate, port: u16, generation: u8, prefix: &str) {
    let prefix: ipnet::Ipv4Net = prefix.parse().expect("prefix");
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&prefix.addr().octets());
    let map = gate
        .ebpf_mut()
        .map_mut(map_names::ALLOW)
        .expect("the allowlist map");
    let mut tries: HashOfMaps<&mut MapData, PortKey, LpmTrie<MapData, AllowKey, u32>> =
        HashOfMaps::try_from(map).expect("a hash of maps");
    let mut trie = match tries.get(&tcp_key(port), 0) {
        Ok(trie) => trie,
        Err(MapError::KeyNotFound) => {
            let trie =
                LpmTrie::create(portgate_common::capacity::ALLOW_PREFIXES, BPF_F_NO_PREALLOC)
                    .expect("a trie");
            tries
                .insert(tcp_key(port), &trie, 0)
                .expect("put the trie in");
            trie
        }
        Err(err) => panic!("reading the trie of port {port}: {err}"),
    };
    let data = AllowKey {
        generation,
        family: portgate_common::family::V4,
        _pad: [0; 2],
        addr,
    };
    trie.insert(
        &Key::new(AllowKey::PREFIX_BITS + u32::from(prefix.prefix_len()), data),
        1,
        0,
    )
    .expect("plant a prefix");
}

/// The record generation of a port ([`portgate_common::Policy::generation`]).
fn record_generation(gate: &Gate, id: PortId) -> u32 {
    gate.policy(id)
        .expect("policy")
        .expect("a record")
        .generation
}

/// The generation a port's record puts in force.
fn generation(gate: &Gate, id: PortId) -> u8 {
    let record = gate.policy(id).expect("policy").expect("a record");
    u8::from(record.flags & policy_flags::ALLOW_GENERATION != 0)
}

fn syn_passes(gate: &mut Gate, source: &str, port: u16) -> bool {
    let source: IpAddr = source.parse().expect("address");
    gate.test_run(
        PacketHook::Xdp,
        &tcp_syn(source, DESTINATION, 40_000, port),
        1,
    )
    .expect("test run")
    .passed
}

/// Old: allow A, no authentication. New: allow B, authentication required. A source in B
/// with no grant is refused by both, so no SYN of it may pass while one thread flips the
/// port between the two and another test-runs SYNs. B is wide (the source's prefix sorts
/// first of 257) so that the old three-write change, which added B's prefixes under the
/// old record, left a window a few hundred writes long.
#[test]
fn a_policy_change_admits_nothing_that_neither_policy_admits() {
    const FLIPS: u32 = 300;
    const FLIPPING_FOR: Duration = Duration::from_secs(20);
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 40;
    let id = PortId::new(port, Protocol::Tcp);
    let source: IpAddr = "10.2.0.1".parse().expect("address");
    let old = allowing(&["10.1.0.0/16"]);
    let mut wide: Vec<String> = vec!["10.2.0.1/32".to_owned()];
    wide.extend((0..=255).map(|host| format!("10.2.1.{host}/32")));
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    let new = PortPolicy {
        access: PortAccessControl {
            allowed_ips: allowlist(&wide),
            require_authentication: true,
            ..PortAccessControl::default()
        },
        ..PortPolicy::default()
    };
    gate.set_policy(id, &old).expect("the old policy");
    let mut runner = Gate::open(pins.path()).expect("a second handle on the pins");
    // Loaded (and verified) before the flipping starts, not during it.
    for hook in [PacketHook::Xdp, PacketHook::CgroupSkb] {
        let packet = tcp_syn(source, DESTINATION, 29_999, port);
        assert!(
            !runner.test_run(hook, &packet, 1).expect("test run").passed,
            "the old policy refuses {source}"
        );
    }
    let start = Barrier::new(2);

    let (flips, runs, passed) = thread::scope(|scope| {
        let flipper = scope.spawn(|| {
            start.wait();
            let begun = Instant::now();
            let mut flips = 0;
            while flips < FLIPS && begun.elapsed() < FLIPPING_FOR {
                let policy = if flips % 2 == 0 { &new } else { &old };
                gate.set_policy(id, policy).expect("flip the policy");
                flips += 1;
            }
            flips
        });
        let (mut runs, mut passed) = (0_u64, Vec::new());
        let mut sport: u16 = 30_000;
        start.wait();
        while !flipper.is_finished() {
            for hook in [PacketHook::Xdp, PacketHook::CgroupSkb] {
                let packet = tcp_syn(source, DESTINATION, sport, port);
                if runner.test_run(hook, &packet, 1).expect("test run").passed {
                    passed.push((hook, sport));
                }
                runs += 1;
            }
            // A new flow each time: an admitted SYN's reservation would pass its retransmission.
            sport = sport.checked_add(1).unwrap_or(30_000);
        }
        (flipper.join().expect("the flipping thread"), runs, passed)
    });

    println!("{flips} flips, {runs} SYNs test-run");
    assert!(runs > 0, "no SYN was test-run while the policy changed");
    assert!(
        passed.is_empty(),
        "{} of {runs} SYNs from {source} passed during {flips} changes, though neither policy \
         admits it: {:?}",
        passed.len(),
        &passed[..passed.len().min(10)]
    );
    let counters = gate.counters(id).expect("counters");
    assert_eq!(counters.total.accepted, 0, "no connection accepted");
    assert_eq!(
        counters.total.dropped_for(reason::NOT_ALLOWED)
            + counters.total.dropped_for(reason::AUTH_REQUIRED),
        counters.total.packets,
        "every SYN dropped as not allowed or as needing authentication"
    );
}

/// `prefixes` as the trie should hold them for `id`: under the generation in force.
fn in_force(gate: &Gate, id: PortId, prefixes: &[&str]) -> BTreeSet<(u8, IpNet)> {
    let generation = generation(gate, id);
    allowlist(prefixes)
        .iter()
        .map(|prefix| (generation, *prefix))
        .collect()
}

#[test]
fn a_change_leaves_only_the_new_allowlist_in_the_trie() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 41;
    let id = PortId::new(port, Protocol::Tcp);

    gate.set_policy(id, &allowing(&["10.1.0.0/16", "10.3.0.0/16"]))
        .expect("first policy");
    let first = generation(&gate, id);
    let mut record_generations = BTreeSet::from([record_generation(&gate, id)]);
    for (step, prefixes) in [
        ["10.2.0.0/16", "10.3.0.0/16"],
        ["10.4.0.0/16", "10.1.0.0/16"],
    ]
    .iter()
    .enumerate()
    {
        gate.set_policy(id, &allowing(prefixes)).expect("a change");
        assert_eq!(
            generation(&gate, id),
            first ^ u8::from(step % 2 == 0),
            "each change switches generation"
        );
        assert!(
            record_generations.insert(record_generation(&gate, id)),
            "step {step}: each write a new record generation"
        );
        assert_eq!(
            port_entries(&mut gate, port),
            in_force(&gate, id, prefixes),
            "step {step}: only the new allowlist is in the trie"
        );
        assert_eq!(
            gate.allowlists().expect("allowlists").get(&id),
            Some(&allowlist(prefixes)),
            "step {step}: allowlists() shows the new set"
        );
    }

    // A change of the record alone keeps the generation and its prefixes.
    let before = generation(&gate, id);
    let mut authenticated = allowing(&["10.4.0.0/16", "10.1.0.0/16"]);
    authenticated.access.require_authentication = true;
    gate.set_policy(id, &authenticated)
        .expect("require authentication");
    assert_eq!(
        generation(&gate, id),
        before,
        "same allowlist, same generation"
    );
    assert!(
        record_generations.insert(record_generation(&gate, id)),
        "a new record generation all the same (established connections are judged again)"
    );
    // A new handle (the daemon restarting) goes on past the generations written.
    let mut again = Gate::open(pins.path()).expect("a new handle");
    again.set_policy(id, &authenticated).expect("rewrite");
    assert!(
        record_generation(&again, id) > *record_generations.last().expect("generations"),
        "a record generation not used before"
    );
    assert_eq!(
        port_entries(&mut gate, port),
        in_force(&gate, id, &["10.4.0.0/16", "10.1.0.0/16"])
    );

    gate.remove_policy(id).expect("remove the policy");
    assert!(
        port_entries(&mut gate, port).is_empty(),
        "no prefix left in either generation"
    );
    assert!(
        !has_trie(&mut gate, port),
        "the port's trie is gone with its policy"
    );
    assert!(!gate.allowlists().expect("allowlists").contains_key(&id));
}

#[test]
fn leftovers_of_a_change_cut_short_never_come_in_force() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 43;
    let id = PortId::new(port, Protocol::Tcp);
    gate.set_policy(id, &allowing(&["10.4.0.0/16"]))
        .expect("a policy");

    // A crash in the middle of a change left a prefix under the unused generation. A new
    // handle (the daemon restarting) removes it on its first walk, so the next change does
    // not bring it in force.
    let unused = generation(&gate, id) ^ 1;
    plant(&mut gate, port, unused, "10.9.0.0/16");
    drop(gate);
    let mut gate = Gate::open(pins.path()).expect("a new handle");
    assert_eq!(
        gate.allowlists().expect("allowlists").get(&id),
        Some(&allowlist(&["10.4.0.0/16"])),
        "allowlists() shows the generation in force only"
    );
    gate.set_policy(id, &allowing(&["10.5.0.0/16"]))
        .expect("a change");
    assert_eq!(
        generation(&gate, id),
        unused,
        "switched to the other generation"
    );
    assert!(
        !syn_passes(&mut gate, "10.9.0.1", port),
        "the leftover is not in force"
    );
    assert!(
        syn_passes(&mut gate, "10.5.0.1", port),
        "the new allowlist is"
    );
    assert_eq!(
        port_entries(&mut gate, port),
        in_force(&gate, id, &["10.5.0.0/16"]),
        "the leftover is gone"
    );

    // A port with no record (an allocation cut short) shows every prefix it has, of both
    // generations, so reconciliation sees it; removing its policy removes them all.
    let orphan = MIN_PORT + 42;
    plant(&mut gate, orphan, 0, "10.6.0.0/16");
    plant(&mut gate, orphan, 1, "10.7.0.0/16");
    let orphan_id = PortId::new(orphan, Protocol::Tcp);
    assert_eq!(
        gate.allowlists().expect("allowlists").get(&orphan_id),
        Some(&allowlist(&["10.6.0.0/16", "10.7.0.0/16"]))
    );
    let mut fresh = Gate::open(pins.path()).expect("a new handle");
    fresh.remove_policy(orphan_id).expect("remove the orphan");
    assert!(
        port_entries(&mut fresh, orphan).is_empty(),
        "no prefix of the orphan left, in either generation"
    );
    assert!(!has_trie(&mut fresh, orphan), "nor its trie");
    assert_eq!(
        port_entries(&mut fresh, port).len(),
        1,
        "the other port's kept"
    );
}

#[test]
fn a_record_whose_trie_is_missing_admits_nobody() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 44;
    gate.set_policy(
        PortId::new(port, Protocol::Tcp),
        &allowing(&["10.4.0.0/16"]),
    )
    .expect("a policy");
    assert!(
        syn_passes(&mut gate, "10.4.0.1", port),
        "the list is in force"
    );
    let map = gate
        .ebpf_mut()
        .map_mut(map_names::ALLOW)
        .expect("the allowlist map");
    let mut tries: HashOfMaps<&mut MapData, PortKey, LpmTrie<MapData, AllowKey, u32>> =
        HashOfMaps::try_from(map).expect("a hash of maps");
    tries.remove(&tcp_key(port)).expect("take the trie out");
    assert!(!syn_passes(&mut gate, "10.4.0.1", port), "no trie: nobody");
}
