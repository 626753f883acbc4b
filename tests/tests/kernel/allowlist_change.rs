//! Allowlist changes seen whole (issue #10 item 6, issue #12): a packet is judged by the old
//! policy or by the new one, never by the new allowlist with the old record; the old
//! generation of prefixes is gone from the port's trie after a change, leftovers of a
//! change cut short never come in force, every write gives the record a new generation,
//! tries are made in batches and reused, and a record whose trie is missing admits nobody.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::Barrier,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashOfMaps, LpmTrie, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use portgate::{
    gate::{Gate, PacketHook},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{AllowKey, map_names, policy_flags, reason};
use portgate_tests::{
    common::{
        PinDir, allowing, allowlist,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, tcp_syn},
    },
    require_privileges,
};

/// The allowlists map: the tries by number.
type Tries<'a> = HashOfMaps<&'a MapData, u32, LpmTrie<MapData, AllowKey, u32>>;

/// The number of the trie the record of TCP `port` names (0: none, or no record).
fn trie_of(gate: &Gate, port: u16) -> u32 {
    gate.policy(PortId::new(port, Protocol::Tcp))
        .expect("policy")
        .map_or(0, |record| record.allowlist)
}

/// The numbers of every trie in the allowlists map.
fn tries(gate: &mut Gate) -> BTreeSet<u32> {
    let map = gate
        .ebpf_mut()
        .map(map_names::ALLOW)
        .expect("the allowlist map");
    let tries: Tries<'_> = HashOfMaps::try_from(map).expect("a hash of maps");
    tries.keys().map(|key| key.expect("a key")).collect()
}

/// Every entry of trie `number`: (generation, prefix); empty without that trie.
fn trie_entries(gate: &mut Gate, number: u32) -> BTreeSet<(u8, IpNet)> {
    let map = gate
        .ebpf_mut()
        .map(map_names::ALLOW)
        .expect("the allowlist map");
    let tries: Tries<'_> = HashOfMaps::try_from(map).expect("a hash of maps");
    let trie = match tries.get(&number, 0) {
        Ok(trie) => trie,
        Err(MapError::KeyNotFound) => return BTreeSet::new(),
        Err(err) => panic!("reading trie {number}: {err}"),
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

/// Every entry of the trie of TCP `port`'s record.
fn port_entries(gate: &mut Gate, port: u16) -> BTreeSet<(u8, IpNet)> {
    let number = trie_of(gate, port);
    trie_entries(gate, number)
}

/// Writes an IPv4 prefix straight into trie `number` under `generation`, as a change cut
/// short by a crash would have left it.
fn plant(gate: &mut Gate, number: u32, generation: u8, prefix: &str) {
    let prefix: ipnet::Ipv4Net = prefix.parse().expect("prefix");
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&prefix.addr().octets());
    let map = gate
        .ebpf_mut()
        .map(map_names::ALLOW)
        .expect("the allowlist map");
    let tries: Tries<'_> = HashOfMaps::try_from(map).expect("a hash of maps");
    let mut trie = tries.get(&number, 0).expect("the trie");
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
    let trie = trie_of(&gate, port);
    assert_ne!(trie, 0, "the port has a trie");
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
        assert_eq!(trie_of(&gate, port), trie, "step {step}: the same trie");
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
    assert_eq!(
        port_entries(&mut gate, port),
        in_force(&gate, id, &["10.4.0.0/16", "10.1.0.0/16"])
    );
    // A new handle (the daemon restarting) goes on past the generations written.
    drop(gate);
    let mut gate = Gate::open(pins.path()).expect("a new handle");
    gate.set_policy(id, &authenticated).expect("rewrite");
    assert!(
        record_generation(&gate, id) > *record_generations.last().expect("generations"),
        "a record generation not used before"
    );

    // Released: the trie is emptied and handed to the next port with an allowlist.
    gate.remove_policy(id).expect("remove the policy");
    assert!(
        trie_entries(&mut gate, trie).is_empty(),
        "nothing left in the trie"
    );
    assert!(!gate.allowlists().expect("allowlists").contains_key(&id));
    let next = MIN_PORT + 45;
    gate.set_policy(
        PortId::new(next, Protocol::Tcp),
        &allowing(&["10.7.0.0/16"]),
    )
    .expect("another port");
    assert_eq!(trie_of(&gate, next), trie, "the trie is reused");
    assert!(syn_passes(&mut gate, "10.7.0.1", next));
    assert!(
        !syn_passes(&mut gate, "10.4.0.1", next),
        "nothing of the old list"
    );
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
    let trie = trie_of(&gate, port);
    plant(&mut gate, trie, unused, "10.9.0.0/16");
    // And a released port's trie (back in the pool) holds a leftover too.
    let released = MIN_PORT + 42;
    gate.set_policy(
        PortId::new(released, Protocol::Tcp),
        &allowing(&["10.6.0.0/16"]),
    )
    .expect("a policy");
    let pooled = trie_of(&gate, released);
    gate.remove_policy(PortId::new(released, Protocol::Tcp))
        .expect("release");
    plant(&mut gate, pooled, 0, "10.6.0.0/16");
    plant(&mut gate, pooled, 1, "10.7.0.0/16");
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
    assert!(
        trie_entries(&mut gate, pooled).is_empty(),
        "the pooled trie was emptied by the first walk"
    );
    let next = MIN_PORT + 46;
    gate.set_policy(
        PortId::new(next, Protocol::Tcp),
        &allowing(&["10.8.0.0/16"]),
    )
    .expect("a port that gets the pooled trie");
    assert_eq!(trie_of(&gate, next), pooled);
    assert!(
        !syn_passes(&mut gate, "10.6.0.1", next),
        "no leftover in force"
    );
    assert!(
        !syn_passes(&mut gate, "10.7.0.1", next),
        "in either generation"
    );
}

#[test]
fn tries_are_made_in_batches_and_reused() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    // Room for a few hundred ports (nothing is attached: the programs are only test-run).
    let mut gate = install(&portgate::gate::GateSettings {
        max_port: MIN_PORT + 999,
        ..settings(&pins)
    });
    let batch = portgate::gate::TRIES_PER_BATCH;
    let count = u16::try_from(batch + batch / 2).expect("a few hundred");
    let first = MIN_PORT + 100;
    for port in first..first + count {
        gate.set_policy(
            PortId::new(port, Protocol::Tcp),
            &allowing(&["10.8.0.0/16"]),
        )
        .expect("a policy");
    }
    let numbers: BTreeSet<u32> = (first..first + count)
        .map(|port| trie_of(&gate, port))
        .collect();
    assert_eq!(numbers.len(), usize::from(count), "a trie of its own each");
    assert_eq!(
        tries(&mut gate).len(),
        usize::try_from(2 * batch).expect("small"),
        "made two batches at a time"
    );
    for port in first..first + count {
        gate.remove_policy(PortId::new(port, Protocol::Tcp))
            .expect("release");
    }
    let again = first + count;
    for port in again..again + count {
        gate.set_policy(
            PortId::new(port, Protocol::Tcp),
            &allowing(&["10.9.0.0/16"]),
        )
        .expect("a policy");
    }
    assert_eq!(
        tries(&mut gate).len(),
        usize::try_from(2 * batch).expect("small"),
        "released tries were reused: no new ones made"
    );
    assert!(syn_passes(&mut gate, "10.9.0.1", again));
    assert!(
        !syn_passes(&mut gate, "10.8.0.1", again),
        "nothing of the last owner's"
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
    let number = trie_of(&gate, port);
    let map = gate
        .ebpf_mut()
        .map_mut(map_names::ALLOW)
        .expect("the allowlist map");
    let mut tries: HashOfMaps<&mut MapData, u32, LpmTrie<MapData, AllowKey, u32>> =
        HashOfMaps::try_from(map).expect("a hash of maps");
    tries.remove(&number).expect("take the trie out");
    assert!(!syn_passes(&mut gate, "10.4.0.1", port), "no trie: nobody");
}
