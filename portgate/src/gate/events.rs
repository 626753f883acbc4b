//! Deny events from the kernel's ring buffer, as an async stream.

use std::{
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, RingBuf};
use portgate_common::{DenyEvent, PortKey, map_names, reason};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use super::{
    Gate, GateError,
    keys::{addr_from_bytes, port_of},
};
use crate::{
    host::HostError,
    model::{DropReason, PortId},
};

/// A deny event in userspace terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DenyEventRecord {
    /// `CLOCK_MONOTONIC` ns.
    pub time_ns: u64,
    /// The port.
    pub id: PortId,
    /// Source address (bind denials: the address bound).
    pub addr: IpAddr,
    /// Reason name (`bind_denied` for bind denials).
    pub reason: &'static str,
    /// Packet drop reason, `None` for bind denials.
    #[serde(skip)]
    pub drop_reason: Option<DropReason>,
    /// Hook name.
    pub hook: &'static str,
    /// Bind denials: the caller's cgroup id.
    pub cgroup_id: u64,
    /// Bind denials: the caller's pid.
    pub pid: u32,
}

impl DenyEventRecord {
    fn from_kernel(event: &DenyEvent) -> Option<Self> {
        Some(Self {
            time_ns: event.time_ns,
            id: port_of(&PortKey::new(event.netns, event.port, event.proto))?,
            addr: addr_from_bytes(event.family, event.addr),
            reason: reason::name(event.reason),
            drop_reason: DropReason::from_code(event.reason),
            hook: portgate_common::hook::name(event.hook),
            cgroup_id: event.cgroup_id,
            pid: event.pid,
        })
    }
}

/// The deny-event stream. Only one may exist per [`Gate`].
pub struct DenyEvents {
    ring: Ring,
}

/// The ring buffer, registered with tokio on the first `next`, so that `drain` works
/// without a runtime.
enum Ring {
    Plain(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
    /// Only while switching from `Plain` to `Async`.
    Moving,
}

impl Ring {
    fn get_mut(&mut self) -> Option<&mut RingBuf<MapData>> {
        match self {
            Self::Plain(ring) => Some(ring),
            Self::Async(ring) => Some(ring.get_mut()),
            Self::Moving => None,
        }
    }
}

impl DenyEvents {
    /// The next event, waiting for one.
    pub async fn next(&mut self) -> Result<DenyEventRecord, GateError> {
        if let Ring::Plain(_) = self.ring
            && let Ring::Plain(ring) = std::mem::replace(&mut self.ring, Ring::Moving)
        {
            let fd = ring.as_raw_fd();
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until
            // the `AsyncFd` (which owns the ring buffer) is dropped.
            let registered = unsafe { AsyncFd::register(ring) }.map_err(|err| {
                let map = PathBuf::from(format!("{} (fd {fd})", map_names::EVENTS));
                HostError::io("registering", &map)(err.into())
            })?;
            self.ring = Ring::Async(registered);
        }
        let Ring::Async(ring) = &mut self.ring else {
            return Err(GateError::MissingMap {
                name: map_names::EVENTS,
            });
        };
        loop {
            let mut guard = ring
                .readable_mut()
                .await
                .map_err(HostError::io("waiting for", Path::new(map_names::EVENTS)))?;
            while let Some(item) = guard.get_inner_mut().next() {
                if item.len() < size_of::<DenyEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a whole `DenyEvent` (length checked above);
                // `read_unaligned` copes with the record's alignment.
                let event = unsafe { item.as_ptr().cast::<DenyEvent>().read_unaligned() };
                if let Some(record) = DenyEventRecord::from_kernel(&event) {
                    return Ok(record);
                }
            }
            guard.clear_ready();
        }
    }

    /// Events already waiting, without blocking.
    pub fn drain(&mut self) -> Vec<DenyEventRecord> {
        let mut out = Vec::new();
        let Some(ring) = self.ring.get_mut() else {
            return out;
        };
        while let Some(item) = ring.next() {
            if item.len() < size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: as in `next`.
            let event = unsafe { item.as_ptr().cast::<DenyEvent>().read_unaligned() };
            out.extend(DenyEventRecord::from_kernel(&event));
        }
        out
    }
}

impl Gate {
    /// Takes the deny-event stream. [`DenyEvents::next`] needs a tokio runtime with I/O
    /// enabled; [`DenyEvents::drain`] does not.
    pub fn events(&mut self) -> Result<DenyEvents, GateError> {
        let name = map_names::EVENTS;
        let map = self
            .ebpf_mut()
            .take_map(name)
            .ok_or(GateError::MissingMap { name })?;
        let ring = RingBuf::try_from(map).map_err(|err| GateError::map("opening", name, 0, err))?;
        Ok(DenyEvents {
            ring: Ring::Plain(ring),
        })
    }
}
