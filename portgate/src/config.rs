//! The daemon's configuration file (TOML): the specification's [`PortConfig`] under
//! `[ports]`, and [`DaemonConfig`] under `[daemon]`. Every field has a default.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// The specification's port configuration (`[ports]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortConfig {
    /// Lowest managed port.
    pub min_port: u16,
    /// Highest managed port.
    pub max_port: u16,
    /// Ports inside the range that are never handed out.
    pub reserved_ports: Vec<u16>,
    /// Drain timeout: Draining goes Closed at the latest after this.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Random probes before scanning the free ports.
    pub max_retries: u32,
    /// Closed goes Available after this.
    #[serde(with = "humantime_serde")]
    pub quarantine: Duration,
    /// Add the range to `net.ipv4.ip_local_reserved_ports`.
    pub reserve_ephemeral: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        Self {
            min_port: 20_000,
            max_port: 29_999,
            reserved_ports: Vec::new(),
            timeout: Duration::from_secs(30),
            max_retries: 32,
            quarantine: Duration::from_secs(10),
            reserve_ephemeral: true,
        }
    }
}

/// The daemon's own settings (`[daemon]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the store lives.
    pub state_dir: PathBuf,
    /// bpffs directory of the pinned maps and links.
    pub pin_dir: PathBuf,
    /// `auto` (the cgroup2 mount from /proc/mounts) or a cgroup2 directory to attach to.
    pub cgroup: String,
    /// Interfaces to attach XDP to.
    pub xdp_interfaces: Vec<String>,
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// The socket's permission bits (octal string, e.g. "0660").
    pub socket_mode: String,
    /// Members of this group (and root) may do everything.
    pub admin_group: String,
    /// Address of the Prometheus endpoint; empty turns it off.
    pub metrics_listen: String,
    /// The audit log (JSON lines).
    pub audit_log: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(crate::paths::DEFAULT_STATE_DIR),
            pin_dir: PathBuf::from(crate::paths::DEFAULT_PIN_DIR),
            cgroup: "auto".to_owned(),
            xdp_interfaces: Vec::new(),
            socket: PathBuf::from(crate::paths::DEFAULT_SOCKET),
            socket_mode: "0660".to_owned(),
            admin_group: "portgate".to_owned(),
            metrics_listen: "127.0.0.1:9477".to_owned(),
            audit_log: PathBuf::from(crate::paths::DEFAULT_AUDIT_LOG),
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[ports]`.
    pub ports: PortConfig,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
}
