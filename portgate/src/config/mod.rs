//! The daemon's configuration file (TOML): the specification's [`PortConfig`] under
//! `[ports]`, and [`DaemonConfig`] under `[daemon]`. Every field has a default, and
//! `dist/portgate.toml` lists them all (a test keeps it equal to [`Config::default`]).
//!
//! [`Config::load`] reads, parses and validates a file. Each [`ConfigError`], with its
//! causes, is one line that names the file, the key, what is wrong and what to do. The
//! values with a shape of their own (the cgroup, the socket's mode, the metrics address) are
//! typed by the parse itself ([`CgroupTarget`], [`SocketMode`], `Option<SocketAddr>`), so a
//! bad one is refused before validation. Validation errors come from [`Config::validate`]
//! without a file (the values need not come from one) and are wrapped in
//! [`ConfigError::Invalid`] by [`Config::from_toml_str`], which knows the file.

mod cluster;
mod error;
#[cfg(test)]
mod tests;
mod values;

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use self::{
    cluster::{ClusterConfig, MAX_ENDPOINTS, MAX_NODE_NAME, valid_node_name},
    error::ConfigError,
    values::{CgroupTarget, MAX_SOCKET_MODE, OwnerExit, SocketMode, ValueError},
};

/// The highest [`PortConfig::max_retries`] accepted: more probes than this only delay the
/// scan of the free ports that follows them.
pub const MAX_RETRIES_LIMIT: u32 = 1_000_000;

/// The default [`DaemonConfig::audit_max_bytes`]: 64 MiB.
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 64 << 20;
/// The default [`DaemonConfig::audit_keep`].
pub const DEFAULT_AUDIT_KEEP: u32 = 5;
/// The accepted [`DaemonConfig::audit_max_bytes`]: from 4 KiB (a few records; one record
/// is at most a few KiB) to 1 TiB.
pub const AUDIT_MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = (4 << 10)..=(1 << 40);
/// The accepted [`DaemonConfig::audit_keep`]: at least one rotated file, at most 100.
pub const AUDIT_KEEP_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

/// The longest interface name the kernel accepts (`IFNAMSIZ` - 1, for the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

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
    /// Most ports one local user (not root, not the admin group) may hold at once; 0 is
    /// unlimited. Keeps one tenant from taking the range or filling the kernel's maps.
    pub max_ports_per_user: u32,
    /// What happens to an Active port whose owner cgroup is removed.
    pub on_owner_exit: OwnerExit,
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
            max_ports_per_user: 1024,
            on_owner_exit: OwnerExit::Drain,
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
    /// The cgroup2 directory to attach to: `"auto"` (the cgroup2 mount) or its path.
    pub cgroup: CgroupTarget,
    /// Interfaces to attach XDP to.
    pub xdp_interfaces: Vec<String>,
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// The socket's permission bits (an octal string in the file, e.g. "0660").
    pub socket_mode: SocketMode,
    /// Members of this group (and root) may do everything.
    pub admin_group: String,
    /// Address of the Prometheus endpoint; `None` (`""` in the file) turns it off.
    #[serde(with = "values::metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    /// The audit log (JSON lines).
    pub audit_log: PathBuf,
    /// The size at which the audit log is rotated (`audit.log` becomes `audit.log.1`, ...).
    pub audit_max_bytes: u64,
    /// Rotated audit logs kept (`audit.log.1` ..= `audit.log.N`); the oldest goes first.
    /// With the live file, the log takes at most `(audit_keep + 1) * audit_max_bytes`.
    pub audit_keep: u32,
    /// Have the kernel programs write a line for each refusal (a dropped packet with its
    /// reason code, a refused bind) to the daemon's log, target `portgate::kernel`. For
    /// diagnosis: every refusal is a line.
    pub kernel_log: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(crate::paths::DEFAULT_STATE_DIR),
            pin_dir: PathBuf::from(crate::paths::DEFAULT_PIN_DIR),
            cgroup: CgroupTarget::Auto,
            xdp_interfaces: Vec::new(),
            socket: PathBuf::from(crate::paths::DEFAULT_SOCKET),
            socket_mode: SocketMode::default(),
            admin_group: "portgate".to_owned(),
            metrics_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9477))),
            audit_log: PathBuf::from(crate::paths::DEFAULT_AUDIT_LOG),
            audit_max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            audit_keep: DEFAULT_AUDIT_KEEP,
            kernel_log: false,
        }
    }
}

/// `[auth]`: the knock listener, by which a client holding a key opens a port to itself
/// (see `portgate knock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// UDP address of the knock listener; `None` (`""` in the file, the default) turns it
    /// off. Its usual port is 62201, as fwknop's.
    #[serde(with = "values::metrics_listen")]
    pub listen: Option<SocketAddr>,
    /// How far a knock's timestamp may be from the daemon's clock, either way.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            listen: None,
            window: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// The longest window: a knock's nonce is remembered for as long.
    pub const MAX_WINDOW: Duration = Duration::from_hours(1);

    /// Checks the window.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.window < Duration::from_secs(1) || self.window > Self::MAX_WINDOW {
            return Err(ConfigError::KnockWindow { value: self.window });
        }
        Ok(())
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
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[cluster]`: fleet mode, through etcd; absent, the daemon keeps to its own store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

impl PortConfig {
    /// Checks the range rules; returns warnings that do not stop the daemon.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let (min, max) = (self.min_port, self.max_port);
        if min == 0 {
            return Err(ConfigError::MinPortZero);
        }
        if min > max {
            return Err(ConfigError::MinAboveMax { min, max });
        }
        let mut seen = HashSet::with_capacity(self.reserved_ports.len());
        for &port in &self.reserved_ports {
            if !(min..=max).contains(&port) {
                return Err(ConfigError::ReservedOutsideRange { port, min, max });
            }
            if !seen.insert(port) {
                return Err(ConfigError::ReservedDuplicate { port });
            }
        }
        // Every entry is now distinct and inside the range, so equal counts mean all of it.
        if seen.len() == usize::from(max - min) + 1 {
            return Err(ConfigError::AllReserved { min, max });
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if self.max_retries > MAX_RETRIES_LIMIT {
            return Err(ConfigError::TooManyRetries {
                value: self.max_retries,
            });
        }
        let mut warnings = Vec::new();
        if min < 1024 {
            warnings.push(format!(
                "ports.min_port = {min}: ports below 1024 are privileged: owners need \
                 CAP_NET_BIND_SERVICE to bind them and they may collide with system services; \
                 consider 1024 or more"
            ));
        }
        Ok(warnings)
    }
}

impl DaemonConfig {
    /// Checks the daemon's settings; returns warnings that do not stop the daemon (none yet).
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        for (key, path) in [
            ("daemon.state_dir", &self.state_dir),
            ("daemon.pin_dir", &self.pin_dir),
            ("daemon.socket", &self.socket),
            ("daemon.audit_log", &self.audit_log),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::RelativePath {
                    key,
                    path: path.clone(),
                });
            }
        }
        if self.admin_group.trim().is_empty() {
            return Err(ConfigError::EmptyAdminGroup);
        }
        if !AUDIT_MAX_BYTES_RANGE.contains(&self.audit_max_bytes) {
            return Err(ConfigError::AuditMaxBytes {
                value: self.audit_max_bytes,
            });
        }
        if !AUDIT_KEEP_RANGE.contains(&self.audit_keep) {
            return Err(ConfigError::AuditKeep {
                value: self.audit_keep,
            });
        }
        let mut seen = HashSet::with_capacity(self.xdp_interfaces.len());
        for name in &self.xdp_interfaces {
            check_interface_name(name)?;
            if !seen.insert(name.as_str()) {
                return Err(ConfigError::DuplicateInterface { name: name.clone() });
            }
        }
        Ok(Vec::new())
    }
}

/// The kernel's rule for interface names (`dev_valid_name`).
fn check_interface_name(name: &str) -> Result<(), ConfigError> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_IFNAME_LEN {
        "is longer than 15 bytes (the kernel's IFNAMSIZ limit)"
    } else if name == "." || name == ".." {
        "is not an interface name"
    } else if name.contains(['/', ':']) || name.contains(char::is_whitespace) {
        "contains '/', ':' or white space, which interface names cannot"
    } else {
        return Ok(());
    };
    Err(ConfigError::BadInterface {
        name: name.to_owned(),
        why,
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    ///
    /// Warnings are not returned: [`Config::validate`] is cheap and gives them again.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                ConfigError::NotFound {
                    path: path.to_owned(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_owned(),
                    source: error,
                }
            }
        })?;
        Self::from_toml_str(&text, path)
    }

    /// [`Config::load`], except that a missing file gives the defaults unless the caller named
    /// the file `explicit`ly (e.g. with `--config`): a default path may be absent, a path the
    /// user typed may not.
    pub fn load_or_default(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match Self::load(path) {
            Err(ConfigError::NotFound { .. }) if !explicit => Ok(Self::default()),
            result => result,
        }
    }

    /// Parses and validates `text`; `origin` is the file it came from, for the messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|error| {
            let (line, column) = line_column(text, error.span().map_or(0, |span| span.start));
            ConfigError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message: error.message().to_owned(),
            }
        })?;
        let config: Self = serde_path_to_error::deserialize(deserializer)
            .map_err(|error| value_error(origin, &error))?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: origin.to_owned(),
            problem: Box::new(problem),
        })?;
        Ok(config)
    }

    /// Checks every rule of both sections; returns warnings that do not stop the daemon.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = self.ports.validate()?;
        warnings.extend(self.daemon.validate()?);
        self.auth.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(warnings)
    }
}

/// Turns a deserialization error into [`ConfigError::UnknownKey`] or
/// [`ConfigError::InvalidValue`], naming the full key path.
fn value_error(origin: &Path, error: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let key = match error.path().to_string() {
        root if root == "." => "the top level".to_owned(),
        key => key,
    };
    let message = error.inner().message();
    // serde words every `deny_unknown_fields` refusal "unknown field `x`, expected ...".
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let expected = rest.split_once(", ").map_or("", |(_, expected)| expected);
        return ConfigError::UnknownKey {
            path: origin.to_owned(),
            key,
            expected: expected.to_owned(),
        };
    }
    ConfigError::InvalidValue {
        path: origin.to_owned(),
        advice: values::advice(&key).unwrap_or(
            "correct the value (portgate's dist/portgate.toml shows each key's type and default)",
        ),
        key,
        message: message.to_owned(),
    }
}

/// Line and column (in characters), both from 1, of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}
