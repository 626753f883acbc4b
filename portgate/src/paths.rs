//! Every path portgate uses, in one place.

/// Default bpffs directory holding the pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portgate";
/// Where bpffs is mounted when it is missing.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// The mount table read to find the cgroup2 and bpffs mounts.
pub const PROC_MOUNTS: &str = "/proc/self/mounts";
/// BTF of the running kernel.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The running kernel's release string.
pub const OS_RELEASE: &str = "/proc/sys/kernel/osrelease";
/// The calling thread's network namespace.
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";
/// Where `ip netns add NAME` names network namespaces, one file per name.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// procfs: one directory per process, named by its pid.
pub const PROC_DIR: &str = "/proc";
/// A process's network namespace, relative to its directory under [`PROC_DIR`].
pub const PROC_PID_NETNS: &str = "ns/net";
/// The processes of a cgroup, one pid a line, in each cgroup2 directory.
pub const CGROUP_PROCS: &str = "cgroup.procs";

/// Subdirectory of the pin directory holding the maps, one file per map name.
pub const MAPS_SUBDIR: &str = "maps";
/// Subdirectory of the pin directory holding the program links.
pub const LINKS_SUBDIR: &str = "links";

/// Default configuration file of the daemon.
pub const DEFAULT_CONFIG: &str = "/etc/portgate/portgate.toml";
/// Default state directory (the store).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portgate";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/portgate/portgate.sock";
/// Default audit log.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/portgate/audit.log";
/// File name of the embedded store inside the state directory.
pub const STORE_FILE: &str = "portgate.redb";

/// The calling thread's TCP/IPv4 socket table. Through `thread-self` rather than `/proc/net`
/// (which is `/proc/self/net`, the namespace of the process's main thread), so a thread that
/// entered another network namespace reads that namespace's sockets.
pub const PROC_NET_TCP: &str = "/proc/thread-self/net/tcp";
/// The calling thread's TCP/IPv6 socket table (absent when IPv6 is disabled).
pub const PROC_NET_TCP6: &str = "/proc/thread-self/net/tcp6";
/// The calling thread's UDP/IPv4 socket table.
pub const PROC_NET_UDP: &str = "/proc/thread-self/net/udp";
/// The calling thread's UDP/IPv6 socket table (absent when IPv6 is disabled).
pub const PROC_NET_UDP6: &str = "/proc/thread-self/net/udp6";
/// The ephemeral port range of the calling thread's network namespace (`low high`).
pub const IP_LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The ports the kernel never picks as ephemeral ports, in the calling thread's network
/// namespace (`8080,20000-29999`).
pub const IP_LOCAL_RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
