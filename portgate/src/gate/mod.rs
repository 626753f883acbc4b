//! The kernel gate: loads the kernel programs, pins their maps and links under a bpffs
//! directory, attaches them, and reads and writes the maps.
//!
//! Enforcement lives in the pins: the programs keep running while no process holds a
//! [`Gate`], and [`Gate::install`] on a directory that already holds a pinned set adopts it
//! (same maps, counters intact, attachments kept) instead of loading twice.
//! [`uninstall`] detaches and unpins everything.

/// Opens a map of the loaded object as aya's typed map `$kind`, or says which map and
/// why not.
macro_rules! open_map {
    ($gate:expr, $kind:ident, $name:expr, $capacity:expr) => {
        $kind::try_from($gate.map($name)?)
            .map_err(|err| GateError::map("opening", $name, $capacity, err))?
    };
    (mut $gate:expr, $kind:ident, $name:expr, $capacity:expr) => {
        $kind::try_from($gate.map_mut($name)?)
            .map_err(|err| GateError::map("opening", $name, $capacity, err))?
    };
}

mod allowlists;
mod batch;
mod error;
mod events;
mod kernel_log;
mod keys;
mod layout;
mod maps;
mod pins;
mod policies;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps, Xdp, XdpMode,
        links::FdLink,
    },
};
use portgate_common::{
    GateConfig, PortKey, capacity, config_flags, defaults, map_names, program_names,
};

pub use self::{
    allowlists::TRIES_PER_BATCH,
    error::GateError,
    events::{DenyEventRecord, DenyEvents},
    kernel_log::{KernelLog, TARGET as KERNEL_LOG_TARGET},
    maps::{ALLOW_PREFIXES, GateStats, GrantRecord, HookCounters, MapFill, PortCounters},
    pins::{CgroupLinks, PinsRestored},
};
use crate::{
    host::{self, HostError},
    model::NetnsId,
    paths,
};

/// The kernel programs, built by `build.rs` from the portgate-ebpf crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portgate-ebpf"));

/// How to set up the gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateSettings {
    /// bpffs directory for the pins.
    pub pin_dir: PathBuf,
    /// Lowest managed port.
    pub min_port: u16,
    /// Highest managed port.
    pub max_port: u16,
    /// Deny events per second per (port, protocol); 0 turns events off.
    pub events_per_sec: u32,
    /// How long an admitted SYN holds a connection slot before its handshake completes.
    pub pending_ttl: Duration,
    /// How the `cgroup_skb` program finds a packet's network namespace.
    pub skb_netns: SkbNetns,
}

impl Default for GateSettings {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(paths::DEFAULT_PIN_DIR),
            min_port: 20_000,
            max_port: 29_999,
            events_per_sec: defaults::EVENTS_PER_SEC,
            pending_ttl: Duration::from_nanos(defaults::PENDING_TTL_NS),
            skb_netns: SkbNetns::Auto,
        }
    }
}

/// How the `cgroup_skb` program finds the network namespace a packet is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SkbNetns {
    /// [`SkbNetns::Cookie`] where the kernel allows it (Linux 6.15 and later), else
    /// [`SkbNetns::SocketStorage`].
    #[default]
    Auto,
    /// `bpf_get_netns_cookie` of the packet.
    Cookie,
    /// The namespace the bind and `sock_ops` programs recorded in the socket's storage:
    /// for kernels before 6.15. A socket bound before the gate was attached (or before
    /// its port's namespace was allocated anything) has no record and counts as the
    /// host's.
    SocketStorage,
}

/// Program `$name` of type `$kind`, loaded into the kernel (once).
macro_rules! loaded_program {
    ($ebpf:expr, $name:expr, $kind:ty) => {{
        let name: &'static str = $name;
        let program: &mut $kind = $ebpf
            .program_mut(name)
            .ok_or(GateError::MissingProgram { name })?
            .try_into()
            .map_err(|err| GateError::program("typing", name, err))?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|err| GateError::program("loading", name, err))?;
        }
        program
    }};
}

/// Loads program `$name` of type `$kind` (unless loaded), attaches it with `$attach`, and
/// pins the link at `$link_path`, so it stays attached after this process lets go of it.
macro_rules! attach_and_pin {
    ($ebpf:expr, $name:expr, $kind:ty, $link_path:expr, |$program:ident| $attach:expr) => {{
        let name: &'static str = $name;
        let $program = loaded_program!($ebpf, name, $kind);
        let id = $attach.map_err(|err| GateError::program("attaching", name, err))?;
        let link = $program
            .take_link(id)
            .map_err(|err| GateError::program("taking the link of", name, err))?;
        let link = FdLink::try_from(link).map_err(|source| GateError::Link {
            name,
            source: Box::new(source),
        })?;
        link.pin($link_path).map_err(|source| GateError::Pin {
            path: $link_path.to_owned(),
            source: Box::new(source),
        })?;
    }};
}

/// Handle on an installed gate: its pinned maps, and the programs this process loaded.
pub struct Gate {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    skb_netns: SkbNetns,
    /// What this handle wrote, read from the maps at its first change (see `Written`).
    written: Option<allowlists::Written>,
    /// Descriptors on the pinned maps and links of an installed gate (see `pins`).
    held: pins::Held,
}

/// The link pin name of the `cgroup_skb` program that asks a packet's namespace.
const SKB_LINK: &str = "cgroup_skb_ingress";
/// The link pin name of its socket-storage fallback.
const SKB_SK_LINK: &str = "cgroup_skb_ingress_sk";

/// The other cgroup programs: (program, link pin name).
const CGROUP_LINKS: [(&str, &str); 3] = [
    (program_names::BIND4, "cgroup_bind4"),
    (program_names::BIND6, "cgroup_bind6"),
    (program_names::SOCK_OPS, "sock_ops"),
];

impl Gate {
    /// Loads the gate into `settings.pin_dir`, or adopts the set already pinned there, and
    /// writes the configuration (managed range, event rate, handshake TTL, and the calling
    /// thread's network namespace as the host's: its ports are those of
    /// [`NetnsId::HOST`](crate::model::NetnsId::HOST)). Attaches nothing: see
    /// [`Gate::attach_cgroup`] and [`Gate::attach_xdp`].
    pub fn install(settings: &GateSettings) -> Result<Self, GateError> {
        if settings.min_port == 0 || settings.min_port > settings.max_port {
            return Err(GateError::InvalidRange {
                min: settings.min_port,
                max: settings.max_port,
            });
        }
        host::kernel::check_version()?;
        host::kernel::raise_memlock_limit();
        host::mounts::prepare_pin_dir(&settings.pin_dir)?;
        for sub in [paths::MAPS_SUBDIR, paths::LINKS_SUBDIR] {
            let dir = settings.pin_dir.join(sub);
            fs::create_dir_all(&dir).map_err(HostError::io("creating", &dir))?;
        }
        let host_netns = host::netns::current_cookie()?;
        let mut gate = Self::load(&settings.pin_dir)?;
        gate.hold_pins()?;
        let previous = gate.config()?;
        gate.skb_netns = settings.skb_netns;
        gate.make_slot_row(PortKey::default())?;
        gate.write_config(&GateConfig {
            min_port: settings.min_port,
            max_port: settings.max_port,
            events_per_sec: settings.events_per_sec,
            // The kernel's lines only while a reader of this process asks for them
            // (`Gate::kernel_log`): a previous daemon's reader is gone.
            flags: previous.flags & !config_flags::KERNEL_LOG,
            _pad: 0,
            pending_ttl_ns: u64::try_from(settings.pending_ttl.as_nanos()).unwrap_or(u64::MAX),
            host_netns,
        })?;
        Ok(gate)
    }

    /// Opens an installed gate's pinned maps (for inspection and policy changes), without
    /// creating anything.
    pub fn open(pin_dir: &Path) -> Result<Self, GateError> {
        let maps_dir = pin_dir.join(paths::MAPS_SUBDIR);
        if !map_names::ALL
            .iter()
            .all(|name| maps_dir.join(name).exists())
        {
            return Err(GateError::NotInstalled {
                pin_dir: pin_dir.to_owned(),
            });
        }
        Self::load(pin_dir)
    }

    /// Loads the object with every map pinned under `pin_dir/maps` (reused when present,
    /// after checking that this build would have made it the same way).
    fn load(pin_dir: &Path) -> Result<Self, GateError> {
        let maps_dir = pin_dir.join(paths::MAPS_SUBDIR);
        layout::check_pinned(&maps_dir)?;
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|err| GateError::Load(Box::new(err)))?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            ebpf,
            skb_netns: SkbNetns::Auto,
            written: None,
            held: pins::Held::default(),
        })
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The gate's configuration as the kernel sees it.
    pub fn config(&self) -> Result<GateConfig, GateError> {
        let array: Array<&MapData, GateConfig> = Array::try_from(self.map(map_names::CONFIG)?)
            .map_err(|err| GateError::map("opening", map_names::CONFIG, 1, err))?;
        array
            .get(&0, 0)
            .map_err(|err| GateError::map("reading", map_names::CONFIG, 1, err))
    }

    fn write_config(&mut self, config: &GateConfig) -> Result<(), GateError> {
        let mut array: Array<&mut MapData, GateConfig> =
            Array::try_from(self.map_mut(map_names::CONFIG)?)
                .map_err(|err| GateError::map("opening", map_names::CONFIG, 1, err))?;
        array
            .set(0, config, 0)
            .map_err(|err| GateError::map("writing", map_names::CONFIG, 1, err))
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_dir.join(paths::LINKS_SUBDIR)
    }

    /// Attaches `cgroup_skb/ingress`, `cgroup/bind4`, `cgroup/bind6` and `sock_ops` to the
    /// cgroup2 directory `cgroup` and pins their links. Attachments already pinned are kept.
    ///
    /// The `cgroup_skb` program is the one [`GateSettings::skb_netns`] asks for; its link
    /// is pinned as `cgroup_skb_ingress`, or `cgroup_skb_ingress_sk` for the socket-storage
    /// fallback (so `attachments` tells which runs).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), GateError> {
        let cgroup_dir = fs::File::open(cgroup).map_err(HostError::io("opening cgroup", cgroup))?;
        let links_dir = self.links_dir();
        if !links_dir.join(SKB_LINK).exists() && !links_dir.join(SKB_SK_LINK).exists() {
            self.attach_skb(&cgroup_dir, &links_dir)?;
        }
        for (name, link_name) in CGROUP_LINKS {
            let link_path = links_dir.join(link_name);
            if link_path.exists() {
                continue;
            }
            let ebpf = &mut self.ebpf;
            if name == program_names::SOCK_OPS {
                attach_and_pin!(ebpf, name, SockOps, &link_path, |p| p
                    .attach(&cgroup_dir, CgroupAttachMode::Single));
            } else {
                attach_and_pin!(ebpf, name, CgroupSockAddr, &link_path, |p| p
                    .attach(&cgroup_dir, CgroupAttachMode::Single));
            }
        }
        self.hold_pins()?;
        self.set_config_flag(config_flags::SKB_ATTACHED)
    }

    /// Loads and attaches the `cgroup_skb` program [`GateSettings::skb_netns`] asks for:
    /// with `Auto`, the one that asks the packet's namespace, or the socket-storage one
    /// when this kernel refuses it.
    fn attach_skb(&mut self, cgroup_dir: &fs::File, links_dir: &Path) -> Result<(), GateError> {
        let ebpf = &mut self.ebpf;
        let with_cookie = match self.skb_netns {
            SkbNetns::SocketStorage => false,
            SkbNetns::Cookie => true,
            SkbNetns::Auto => {
                let program: &mut CgroupSkb = ebpf
                    .program_mut(program_names::SKB)
                    .ok_or(GateError::MissingProgram {
                        name: program_names::SKB,
                    })?
                    .try_into()
                    .map_err(|err| GateError::program("typing", program_names::SKB, err))?;
                program.fd().is_ok() || program.load().is_ok()
            }
        };
        let (name, link) = if with_cookie {
            (program_names::SKB, SKB_LINK)
        } else {
            (program_names::SKB_SOCKET_NETNS, SKB_SK_LINK)
        };
        if !with_cookie {
            // Before the program runs: the sockets it judges need their namespace recorded.
            self.set_config_flag(config_flags::SOCKET_NETNS)?;
        }
        let ebpf = &mut self.ebpf;
        let link_path = links_dir.join(link);
        attach_and_pin!(ebpf, name, CgroupSkb, &link_path, |p| p.attach(
            cgroup_dir,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single
        ));
        Ok(())
    }

    fn set_config_flag(&mut self, flag: u32) -> Result<(), GateError> {
        let mut config = self.config()?;
        config.flags |= flag;
        self.write_config(&config)
    }

    /// Attaches the XDP program to interface `interface` of the calling thread's network
    /// namespace and pins the link. An attachment already pinned is kept.
    ///
    /// XDP sees no socket, so it cannot tell which namespace a packet is for: `carries`
    /// says whose ports the interface's traffic is for (the host's for a host NIC, where
    /// published ports arrive before their DNAT). The kernel keys that by ifindex, which is
    /// unique only within one namespace: attach XDP from one namespace only.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        carries: NetnsId,
        mode: XdpMode,
    ) -> Result<(), GateError> {
        let ifindex =
            nix::net::if_::if_nametoindex(interface).map_err(|_| GateError::NoSuchInterface {
                name: interface.to_owned(),
            })?;
        self.set_interface_netns(ifindex, carries)?;
        let netns = host::kernel::current_netns_inode()?;
        let link_name = format!("xdp-{netns}-{ifindex}");
        let link_path = self.links_dir().join(&link_name);
        if !link_path.exists() {
            let ebpf = &mut self.ebpf;
            attach_and_pin!(ebpf, program_names::XDP, Xdp, &link_path, |p| p
                .attach_to_if_index(ifindex, mode));
        }
        self.hold_pins()?;
        self.set_config_flag(config_flags::XDP_ATTACHED)
    }

    /// Says whose ports the traffic XDP sees on interface `ifindex` is for (see
    /// [`Gate::attach_xdp`]).
    pub fn set_interface_netns(&mut self, ifindex: u32, carries: NetnsId) -> Result<(), GateError> {
        let mut routes: HashMap<&mut MapData, u32, u64> = open_map!(
            mut self,
            HashMap,
            map_names::XDP_NETNS,
            capacity::XDP_NETNS
        );
        let failed = |doing| {
            move |err| GateError::map(doing, map_names::XDP_NETNS, capacity::XDP_NETNS, err)
        };
        if carries.is_host() {
            maps::absent_is_none(routes.remove(&ifindex))
                .map(drop)
                .map_err(failed("removing"))
        } else {
            routes
                .insert(ifindex, carries.0, 0)
                .map_err(failed("writing"))
        }
    }

    /// What is attached: the names of the pinned links (`cgroup_skb_ingress`,
    /// `cgroup_bind4`, `cgroup_bind6`, `sock_ops`, and `xdp-<netns inode>-<ifindex>` per
    /// interface), sorted.
    pub fn attachments(&self) -> Result<Vec<String>, GateError> {
        let dir = self.links_dir();
        let entries = fs::read_dir(&dir).map_err(HostError::io("listing", &dir))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(HostError::io("listing", &dir))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// The loaded object: its programs, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, GateError> {
        self.ebpf.map(name).ok_or(GateError::MissingMap { name })
    }

    /// The file descriptor of a hash or array map, for the batch operations aya lacks.
    fn map_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, GateError> {
        use std::os::fd::AsFd as _;
        match self.map(name)? {
            aya::maps::Map::Array(data)
            | aya::maps::Map::PerCpuArray(data)
            | aya::maps::Map::HashMap(data)
            | aya::maps::Map::PerCpuHashMap(data)
            | aya::maps::Map::LruHashMap(data)
            | aya::maps::Map::HashOfMaps(data) => Ok(data.fd().as_fd()),
            _ => Err(GateError::MissingMap { name }),
        }
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, GateError> {
        self.ebpf
            .map_mut(name)
            .ok_or(GateError::MissingMap { name })
    }
}

/// Detaches every program and unpins every map under `pin_dir`, then removes the
/// directory. The kernel frees what no one else holds. No [`Gate`] on this directory may
/// be in use in this process (its loaded programs would stay loaded until it is dropped).
pub fn uninstall(pin_dir: &Path) -> Result<(), GateError> {
    for sub in [paths::LINKS_SUBDIR, paths::MAPS_SUBDIR] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HostError::io("listing", &dir)(source).into()),
        };
        for entry in entries {
            let path = entry.map_err(HostError::io("listing", &dir))?.path();
            fs::remove_file(&path).map_err(HostError::io("unpinning", &path))?;
        }
        fs::remove_dir(&dir).map_err(HostError::io("removing", &dir))?;
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(HostError::io("removing", pin_dir)(source).into()),
    }
}

/// A packet program, for [`Gate::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketHook {
    /// The XDP program.
    Xdp,
    /// The `cgroup_skb/ingress` program.
    CgroupSkb,
}

/// What one `BPF_PROG_TEST_RUN` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program let the packet through.
    pub passed: bool,
    /// The kernel's average time per run.
    pub duration: Duration,
}

impl Gate {
    /// Runs a packet program on `packet` (from its Ethernet header, for both hooks) with
    /// `BPF_PROG_TEST_RUN`, `repeat` times, against the live maps: the verdict counts and
    /// reserves exactly as for real traffic. Loads the program first if needed.
    pub fn test_run(
        &mut self,
        hook: PacketHook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, GateError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        const XDP_PASS: u32 = 2;
        let options = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        };
        let ebpf = &mut self.ebpf;
        let (passed, result) = match hook {
            PacketHook::Xdp => {
                let program = loaded_program!(ebpf, program_names::XDP, Xdp);
                let result = program
                    .test_run(options)
                    .map_err(|err| GateError::program("test-running", program_names::XDP, err))?;
                (result.return_value == XDP_PASS, result)
            }
            PacketHook::CgroupSkb => {
                let program = loaded_program!(ebpf, program_names::SKB, CgroupSkb);
                let result = program
                    .test_run(options)
                    .map_err(|err| GateError::program("test-running", program_names::SKB, err))?;
                // Bit 0 is the verdict; higher bits carry congestion notification.
                (result.return_value & 1 == 1, result)
            }
        };
        Ok(TestRunOutcome {
            passed,
            duration: result.duration,
        })
    }
}
