//! The layout each map has in this build, checked against pinned maps before they are
//! reused: a set pinned by another build with other record sizes must not be adopted.

use std::{mem::size_of, path::Path};

use aya::maps::MapData;
use portgate_common::{
    AddrKey, ConnSlots, CounterKey, Counters, EventRate, FlowKey, GateConfig, HandoffKey,
    PendingSyn, Policy, PortKey, SocketState, capacity, map_names,
};

use super::GateError;

const fn size<T>() -> u32 {
    // Every record is a few dozen bytes.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "records are far below 4 GiB"
    )]
    let bytes = size_of::<T>() as u32;
    bytes
}

/// (name, key size, value size, max entries) of every map, as the object declares them.
fn expected() -> [(&'static str, (u32, u32, u32)); 14] {
    [
        (
            map_names::POLICY,
            (size::<PortKey>(), size::<Policy>(), capacity::POLICIES),
        ),
        // A map of maps: its values are the inner maps' ids.
        (
            map_names::ALLOW,
            (size::<u32>(), size::<u32>(), capacity::POLICIES),
        ),
        (
            map_names::GRANTS,
            (size::<AddrKey>(), size::<u64>(), capacity::GRANTS),
        ),
        (
            map_names::COUNTERS,
            (size::<CounterKey>(), size::<Counters>(), capacity::COUNTERS),
        ),
        (
            map_names::SLOTS,
            (size::<PortKey>(), size::<ConnSlots>(), capacity::SLOTS),
        ),
        (
            map_names::PENDING,
            (size::<FlowKey>(), size::<PendingSyn>(), capacity::PENDING),
        ),
        // Socket storage has no entry count: one value per socket.
        (
            map_names::SOCKETS,
            (size::<i32>(), size::<SocketState>(), 0),
        ),
        (map_names::EVENTS, (0, 0, capacity::EVENTS_BYTES)),
        (
            map_names::EVENT_RATE,
            (size::<PortKey>(), size::<EventRate>(), capacity::EVENT_RATE),
        ),
        (map_names::CONFIG, (size::<u32>(), size::<GateConfig>(), 1)),
        (
            map_names::STATS,
            (size::<u32>(), size::<u64>(), capacity::STATS),
        ),
        (
            map_names::HANDOFF,
            (size::<HandoffKey>(), size::<u64>(), capacity::HANDOFF),
        ),
        (
            map_names::XDP_NETNS,
            (size::<u32>(), size::<u64>(), capacity::XDP_NETNS),
        ),
        (map_names::KERNEL_LOG, (0, 0, capacity::KERNEL_LOG_BYTES)),
    ]
}

/// Fails with [`GateError::IncompatiblePin`] when a map pinned in `maps_dir` differs from
/// what this build declares. Absent pins are fine: they will be created.
pub fn check_pinned(maps_dir: &Path) -> Result<(), GateError> {
    for (name, wanted) in expected() {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path)
            .map_err(|err| GateError::map("opening the pin of", name, wanted.2, err))?;
        let info = map
            .info()
            .map_err(|err| GateError::map("reading the info of", name, wanted.2, err))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != wanted {
            return Err(GateError::IncompatiblePin {
                path,
                found,
                expected: wanted,
            });
        }
    }
    Ok(())
}
