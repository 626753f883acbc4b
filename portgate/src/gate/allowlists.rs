//! Each port's allowlist in a trie of its own, so that a lookup walks that port's prefixes
//! only. The tries live in a map of maps keyed by trie number; a port's record names its
//! trie ([`Policy::allowlist`]) and which of two generations of prefixes in it is in force.
//!
//! Tries are made ahead of need, [`TRIES_PER_BATCH`] at a time, and handed out from a pool
//! of spare ones: each update of a map of maps waits for an RCU grace period (the kernel
//! makes sure no program still reads what it replaced), 7-20 ms here, so one per port would
//! cost an allocation with an allowlist that much, and 10,000 of them minutes. A batch
//! waits once. A released port's trie is emptied and goes back to the pool; tries are never
//! removed while the gate is installed, so their number follows the most ports that had an
//! allowlist at once (rounded up to a batch).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{
    HashOfMaps, IterableMap as _, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie,
};
use ipnet::IpNet;
use portgate_common::{AllowKey, SocketState, capacity, map_names};

use super::{
    Gate, GateError,
    keys::{allow_key, allowlist_generation, prefix_of},
    maps::absent_is_none,
};
use crate::model::{Allowlist, PortId};

/// One port's trie, as userspace makes and reads it.
pub(super) type Trie = LpmTrie<MapData, AllowKey, u32>;

/// Tries made and put in the map per batch. Each is an open file descriptor until its
/// batch is in, so a batch stays well under the usual limit of 1,024 descriptors.
pub const TRIES_PER_BATCH: u32 = 256;

/// What a handle knows of the allowlists and record generations it writes: read from the
/// maps at the first change, and from then on this handle is taken to be the maps' only
/// writer (the daemon is), so a change costs what it writes, not the maps' size.
#[derive(Debug, Default)]
pub(super) struct Written {
    /// What the handle knows of each port's allowlist.
    allowlists: BTreeMap<PortId, KnownAllowlist>,
    /// Prefixes over all tries (both generations), kept within
    /// [`capacity::ALLOW_PREFIXES`].
    prefixes: usize,
    /// The last [`Policy::generation`] written.
    generation: u32,
    /// Empty tries in the map that no port has.
    spare: Vec<u32>,
    /// The number the next trie made gets (numbers start at 1; 0 is none).
    next_trie: u32,
}

impl Written {
    /// A generation no record holds now (wrapping past `u32::MAX`, never
    /// [`SocketState::UNJUDGED`]).
    pub(super) fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == SocketState::UNJUDGED {
            self.generation += 1;
        }
        self.generation
    }
}

/// What a handle knows of one port's allowlist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KnownAllowlist {
    /// The port's trie (0: it has none yet).
    pub(super) trie: u32,
    /// The generation in force: the one the port's record names.
    pub(super) generation: u8,
    /// The prefixes under each generation. The unused one is empty, except after a failed
    /// removal; a change clears it before writing it.
    prefixes: [BTreeSet<IpNet>; 2],
}

impl Gate {
    /// What this handle knows of a port's allowlist, taken out of its cache until
    /// [`Self::put_known`] puts it back; the maps are walked at the first change.
    pub(super) fn take_known(&mut self, id: PortId) -> Result<KnownAllowlist, GateError> {
        if self.written.is_none() {
            let written = self.walk_allowlists()?;
            self.written = Some(written);
        }
        Ok(self
            .written
            .as_mut()
            .and_then(|written| written.allowlists.remove(&id))
            .unwrap_or_default())
    }

    pub(super) fn put_known(&mut self, id: PortId, known: KnownAllowlist) {
        if let Some(written) = self.written.as_mut()
            && known != KnownAllowlist::default()
        {
            written.allowlists.insert(id, known);
        }
    }

    /// The prefixes over all tries (both generations), once this handle has read them.
    pub(super) fn allow_prefixes(&self) -> Option<usize> {
        self.written.as_ref().map(|written| written.prefixes)
    }

    /// A new record generation (see [`Written::next_generation`]).
    pub(super) fn next_generation(&mut self) -> u32 {
        self.written.as_mut().map_or(1, Written::next_generation)
    }

    /// Gives the port of `known` a trie from the pool if it has none, making a batch of
    /// them when the pool is empty.
    pub(super) fn give_trie(&mut self, known: &mut KnownAllowlist) -> Result<(), GateError> {
        if known.trie != 0 {
            return Ok(());
        }
        if self.written.as_ref().is_some_and(|w| w.spare.is_empty()) {
            self.make_tries()?;
        }
        known.trie = self
            .written
            .as_mut()
            .and_then(|written| written.spare.pop())
            .ok_or(GateError::MapFull {
                map: map_names::ALLOW,
                capacity: capacity::POLICIES,
            })?;
        Ok(())
    }

    /// Takes back the trie of a released port (emptied) into the pool.
    pub(super) fn take_back_trie(&mut self, known: &mut KnownAllowlist) {
        if known.trie != 0
            && let Some(written) = self.written.as_mut()
        {
            written.spare.push(known.trie);
            known.trie = 0;
        }
    }

    /// Makes [`TRIES_PER_BATCH`] empty tries and puts them in the map in one batch.
    fn make_tries(&mut self) -> Result<(), GateError> {
        let failed =
            |doing| move |err| GateError::map(doing, map_names::ALLOW, capacity::POLICIES, err);
        let first = self.written.as_ref().map_or(1, |w| w.next_trie.max(1));
        let count = TRIES_PER_BATCH.min(capacity::POLICIES.saturating_sub(first - 1));
        if count == 0 {
            return Err(GateError::MapFull {
                map: map_names::ALLOW,
                capacity: capacity::POLICIES,
            });
        }
        let tries = (0..count)
            .map(|_| {
                Trie::create(
                    capacity::ALLOW_PREFIXES,
                    aya_obj::generated::BPF_F_NO_PREALLOC,
                )
                .map_err(failed("making a trie for"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = Vec::new();
        let mut fds = Vec::new();
        for (number, trie) in (first..).zip(&tries) {
            keys.extend_from_slice(&number.to_ne_bytes());
            let fd = trie.map().fd().as_fd().as_raw_fd();
            fds.extend_from_slice(&u32::try_from(fd).unwrap_or(u32::MAX).to_ne_bytes());
        }
        match super::batch::update_all(self.map_fd(map_names::ALLOW)?, &keys, &fds, tries.len()) {
            Ok(()) => {}
            // A kernel without batch updates of this map type: one by one, a wait each.
            Err(err) if batch_unsupported(&err) => {
                let mut map: HashOfMaps<&mut MapData, u32, Trie> =
                    open_map!(mut self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
                for (number, trie) in (first..).zip(&tries) {
                    map.insert(number, trie, 0).map_err(failed("writing"))?;
                }
            }
            Err(io_error) => {
                return Err(failed("writing")(MapError::SyscallError(
                    aya::sys::SyscallError {
                        call: "bpf_map_update_batch",
                        io_error,
                    },
                )));
            }
        }
        if let Some(written) = self.written.as_mut() {
            written.next_trie = first + count;
            // Handed out lowest first.
            written.spare.extend((first..first + count).rev());
        }
        Ok(())
    }

    /// Puts in force generation `generation ^ 1` holding `wanted` in the port's trie,
    /// writing the record (`write(g)` writes the record naming generation `g`) in between:
    /// the new prefixes go in under the unused generation, one write of the record switches
    /// to them, then the old ones go. `known` follows the trie at every step, failed ones
    /// included. An unchanged list costs one write of the record.
    pub(super) fn switch_allowlist(
        &mut self,
        known: &mut KnownAllowlist,
        wanted: BTreeSet<IpNet>,
        mut write: impl FnMut(&mut Self, u8) -> Result<(), GateError>,
    ) -> Result<(), GateError> {
        let in_force = known.generation;
        let spare = in_force ^ 1;
        // Leftovers under the unused generation would come in force with it.
        self.clear_generation(known, spare)?;
        if wanted == known.prefixes[usize::from(in_force)] {
            return write(self, in_force);
        }
        let held = self.written.as_ref().map_or(0, |written| written.prefixes);
        if held + wanted.len() > capacity::ALLOW_PREFIXES as usize {
            return Err(GateError::MapFull {
                map: map_names::ALLOW,
                capacity: capacity::ALLOW_PREFIXES,
            });
        }
        // From here until they are taken out again, any of them may be in the trie.
        self.count_prefixes(wanted.len(), 0);
        known.prefixes[usize::from(spare)] = wanted;
        let switched = self
            .each_prefix(known.trie, spare, &known.prefixes[usize::from(spare)], true)
            .and_then(|()| write(self, spare));
        if let Err(err) = switched {
            self.clear_generation(known, spare)?;
            return Err(err);
        }
        known.generation = spare;
        self.clear_generation(known, in_force)
    }

    /// Removes a port's prefixes of `generation`, as `known` lists them, and forgets them.
    pub(super) fn clear_generation(
        &mut self,
        known: &mut KnownAllowlist,
        generation: u8,
    ) -> Result<(), GateError> {
        let prefixes = &mut known.prefixes[usize::from(generation)];
        if !prefixes.is_empty() {
            self.each_prefix(known.trie, generation, prefixes, false)?;
            let removed = prefixes.len();
            prefixes.clear();
            self.count_prefixes(0, removed);
        }
        Ok(())
    }

    /// Keeps the gate-wide count of prefixes in the tries.
    fn count_prefixes(&mut self, added: usize, removed: usize) {
        if let Some(written) = self.written.as_mut() {
            written.prefixes = (written.prefixes + added).saturating_sub(removed);
        }
    }

    /// Adds (`add`) or removes (absent ones are no error) the trie keys of `prefixes`
    /// under `generation` in trie `number`, stopping at the first error.
    fn each_prefix(
        &mut self,
        number: u32,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
        add: bool,
    ) -> Result<(), GateError> {
        let doing = if add {
            "adding a prefix"
        } else {
            "removing a prefix"
        };
        let failed = |err| GateError::map(doing, map_names::ALLOW, capacity::ALLOW_PREFIXES, err);
        let tries: HashOfMaps<&MapData, u32, Trie> =
            open_map!(self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        let Some(mut trie) = absent_is_none(tries.get(&number, 0)).map_err(failed)? else {
            // A port with no trie has no prefix to remove; one to add needs its trie.
            return if add {
                Err(failed(MapError::KeyNotFound))
            } else {
                Ok(())
            };
        };
        for prefix in prefixes {
            let (bits, data) = allow_key(generation, *prefix);
            let key = Key::new(bits, data);
            let done = if add {
                trie.insert(&key, 1, 0)
            } else {
                absent_is_none(trie.remove(&key)).map(drop)
            };
            done.map_err(failed)?;
        }
        Ok(())
    }

    /// The first walk: every trie's prefixes of both generations, and what each port's
    /// record puts in force. A port's entries of the unused generation (left by a change
    /// cut short) are removed, so that no later switch can bring them in force; so are all
    /// the entries of a trie no record names, which then joins the pool. Also finds the
    /// highest record generation, for the next write to go past it.
    fn walk_allowlists(&mut self) -> Result<Written, GateError> {
        let mut generation = 0;
        self.each_record(|_, _, record| generation = generation.max(record.generation))?;
        let mut stored = self.stored_tries()?;
        let next_trie = stored.keys().max().map_or(1, |last| last + 1);
        let mut allowlists = BTreeMap::new();
        for (id, record) in self.policies()? {
            let Some(prefixes) = stored.remove(&record.allowlist) else {
                continue;
            };
            let mut known = KnownAllowlist {
                trie: record.allowlist,
                generation: allowlist_generation(&record),
                prefixes,
            };
            let unused = known.generation ^ 1;
            self.clear_generation(&mut known, unused)?;
            allowlists.insert(id, known);
        }
        let mut spare = Vec::new();
        for (number, prefixes) in stored {
            let mut known = KnownAllowlist {
                trie: number,
                generation: 0,
                prefixes,
            };
            self.clear_generation(&mut known, 0)?;
            self.clear_generation(&mut known, 1)?;
            spare.push(number);
        }
        spare.sort_unstable_by(|a, b| b.cmp(a));
        let prefixes = allowlists
            .values()
            .map(|known| known.prefixes.iter().map(BTreeSet::len).sum::<usize>())
            .sum();
        Ok(Written {
            allowlists,
            prefixes,
            generation,
            spare,
            next_trie,
        })
    }

    /// Every allowlist in force, by port, each sorted: the generation its record names, in
    /// the trie it names. Reads every allocated port's trie.
    pub fn allowlists(&self) -> Result<BTreeMap<PortId, Allowlist>, GateError> {
        let stored = self.stored_tries()?;
        Ok(self
            .policies()?
            .into_iter()
            .filter_map(|(id, record)| {
                let [zero, one] = stored.get(&record.allowlist)?;
                let prefixes = if allowlist_generation(&record) == 0 {
                    zero
                } else {
                    one
                };
                (!prefixes.is_empty()).then(|| (id, prefixes.iter().copied().collect()))
            })
            .collect())
    }

    /// The number of every trie in the map, with its prefixes by generation.
    fn stored_tries(&self) -> Result<BTreeMap<u32, [BTreeSet<IpNet>; 2]>, GateError> {
        let tries: HashOfMaps<&MapData, u32, Trie> =
            open_map!(self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        let failed =
            |doing| move |err| GateError::map(doing, map_names::ALLOW, capacity::POLICIES, err);
        let mut found: BTreeMap<u32, [BTreeSet<IpNet>; 2]> = BTreeMap::new();
        for number in tries.keys() {
            let number = number.map_err(failed("listing"))?;
            let Some(trie) = absent_is_none(tries.get(&number, 0)).map_err(failed("reading"))?
            else {
                continue;
            };
            let prefixes = found.entry(number).or_default();
            for entry in trie.keys() {
                let entry = entry.map_err(failed("listing a trie of"))?;
                if let Some((generation, prefix)) = prefix_of(entry.prefix_len(), &entry.data()) {
                    prefixes[generation].insert(prefix);
                }
            }
        }
        Ok(found)
    }
}

/// Whether a batch syscall failed because the kernel has no batch operation for the map
/// (`EINVAL` from kernels that predate it for the map type, `ENOTSUPP`, `EOPNOTSUPP`).
fn batch_unsupported(err: &std::io::Error) -> bool {
    /// The kernel's internal `ENOTSUPP`, which reaches userspace from BPF syscalls.
    const ENOTSUPP: i32 = 524;
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}
