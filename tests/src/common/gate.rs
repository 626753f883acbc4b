//! Gates a test installs itself, without the daemon: the settings they start from, a
//! port served on loopback behind one, and a count of what its pinned maps hold.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    time::Duration,
};

use aya::maps::{MapData, MapType};

use portgate::{
    gate::{Gate, GateSettings},
    model::{PortId, PortPolicy, Protocol},
};

use super::{EchoServer, NetNs, PinDir, TestCgroup, connect_from, listen_in, loopback};

/// The lowest port a test's gate manages (unless a test sets another range).
pub const MIN_PORT: u16 = 21_000;
/// The highest.
pub const MAX_PORT: u16 = 21_099;

/// The settings of a gate pinned in `pins` that manages [`MIN_PORT`]`..=`[`MAX_PORT`], with
/// the daemon's event rate and handshake TTL; a test changes what its scenario needs
/// (`GateSettings { events_per_sec: 50, ..settings(&pins) }`).
pub fn settings(pins: &PinDir) -> GateSettings {
    GateSettings {
        pin_dir: pins.path().to_owned(),
        min_port: MIN_PORT,
        max_port: MAX_PORT,
        ..GateSettings::default()
    }
}

/// Installs the gate `settings` describe (or adopts the one pinned there).
pub fn install(settings: &GateSettings) -> Gate {
    Gate::install(settings).expect("install the gate")
}

/// One TCP port served on loopback inside a test namespace by an echo server whose socket
/// is in a test cgroup, with the gate's cgroup programs attached to that cgroup. Fields
/// drop in order: the server first, the pins last.
pub struct LoopbackPort {
    _server: EchoServer,
    /// The gate, to change the port's policy and read its counters.
    pub gate: Gate,
    /// The namespace the port is served in.
    pub ns: NetNs,
    _cgroup: TestCgroup,
    _pins: PinDir,
    /// The port.
    pub port: u16,
}

impl LoopbackPort {
    /// Serves `port` (TCP) under `policy`.
    pub fn new(port: u16, policy: &PortPolicy) -> Self {
        Self::with_settings(port, policy, |settings| settings)
    }

    /// Serves `port` (TCP) under `policy`, with the gate's [`settings`] as `edit` changes
    /// them.
    pub fn with_settings(
        port: u16,
        policy: &PortPolicy,
        edit: impl FnOnce(GateSettings) -> GateSettings,
    ) -> Self {
        let pins = PinDir::new();
        let cgroup = TestCgroup::new();
        let ns = NetNs::new();
        // The namespace is the gate's host namespace: its ports are the host's.
        let settings = edit(settings(&pins));
        let mut gate = ns.run(|| install(&settings));
        gate.attach_cgroup(cgroup.path())
            .expect("attach to the test cgroup");
        gate.set_policy(PortId::new(port, Protocol::Tcp), policy)
            .expect("set policy");
        let server = ns.run(|| EchoServer::serve(listen_in(&cgroup, loopback(port))));
        Self {
            _server: server,
            gate,
            ns,
            _cgroup: cgroup,
            _pins: pins,
            port,
        }
    }

    /// Connects from `from` inside the namespace, within `within`.
    pub fn connect(&self, from: IpAddr, within: Duration) -> io::Result<TcpStream> {
        self.ns
            .run(|| connect_from(from, loopback(self.port), within))
    }
}

/// The pinned maps of a gate, each counted or left out by its type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapEntries {
    /// Entries of each map whose keys userspace can walk (`BPF_MAP_GET_NEXT_KEY`), by
    /// name (the pin's file name). An array counts all its indices, always.
    pub counted: BTreeMap<String, usize>,
    /// Maps without keys to walk, by name: socket-local storage (and the other local
    /// storages), ring buffers, bloom filters, queues and stacks.
    pub not_iterable: BTreeMap<String, MapType>,
}

/// Counts the entries of every map pinned under `<pin_dir>/maps`. Maps are told apart by
/// their type, never by their name, so that a map the gate adds or renames is counted too.
pub fn map_entries(pin_dir: &Path) -> MapEntries {
    let dir = pin_dir.join(portgate::paths::MAPS_SUBDIR);
    let mut out = MapEntries::default();
    for entry in fs::read_dir(&dir).unwrap_or_else(|err| panic!("listing {}: {err}", dir.display()))
    {
        let path = entry.expect("a pinned map").path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let map = MapData::from_pin(&path)
            .unwrap_or_else(|err| panic!("opening the pinned map {}: {err}", path.display()));
        let info = map.info().expect("map info");
        let kind = info.map_type().expect("a map type aya knows");
        if matches!(
            kind,
            MapType::SkStorage
                | MapType::InodeStorage
                | MapType::TaskStorage
                | MapType::CgrpStorage
                | MapType::RingBuf
                | MapType::UserRingBuf
                | MapType::BloomFilter
                | MapType::Queue
                | MapType::Stack
        ) {
            out.not_iterable.insert(name, kind);
            continue;
        }
        let count = count_keys(
            map.fd().as_fd(),
            info.key_size() as usize,
            info.max_entries(),
        )
        .unwrap_or_else(|err| panic!("walking the keys of {name} ({kind:?}): {err}"));
        out.counted.insert(name, count);
    }
    out
}

/// `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// Walks the keys of the map behind `fd` with `BPF_MAP_GET_NEXT_KEY` (aya 0.14 walks only
/// typed maps): at most `max_entries` of them, and a few more, should the map change
/// meanwhile and the walk start over.
fn count_keys(fd: BorrowedFd<'_>, key_size: usize, max_entries: u32) -> io::Result<usize> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let raw_fd =
        u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut key = vec![0_u8; key_size.max(1)];
    let mut next = vec![0_u8; key_size.max(1)];
    let bound = 2 * max_entries as usize + 16;
    for count in 0..bound {
        let mut attr = NextKeyAttr {
            map_fd: raw_fd,
            _pad: 0,
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the attributes point to two buffers of the map's key size that outlive
        // the call; the kernel reads `key` (none for the first key) and writes `next_key`.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw mut attr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if result != 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ENOENT) {
                Ok(count)
            } else {
                Err(err)
            };
        }
        std::mem::swap(&mut key, &mut next);
    }
    Err(io::Error::other(format!(
        "more than {bound} keys in a map of at most {max_entries}: it changed during the walk"
    )))
}
