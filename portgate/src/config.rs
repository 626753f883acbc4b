//! The daemon's configuration file (TOML): the specification's [`PortConfig`] under
//! `[ports]`, and [`DaemonConfig`] under `[daemon]`. Every field has a default, and
//! `dist/portgate.toml` lists them all (a test keeps it equal to [`Config::default`]).
//!
//! [`Config::load`] reads, parses and validates a file. Each [`ConfigError`] is one line that
//! names the file, the key, what is wrong and what to do. Validation errors come from
//! [`Config::validate`] without a file (the values need not come from one) and are wrapped in
//! [`ConfigError::Invalid`] by [`Config::from_toml_str`], which knows the file.

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The highest [`PortConfig::max_retries`] accepted: more probes than this only delay the
/// scan of the free ports that follows them.
pub const MAX_RETRIES_LIMIT: u32 = 1_000_000;

/// The longest interface name the kernel accepts (`IFNAMSIZ` - 1, for the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// The highest [`DaemonConfig::socket_mode`]: permission bits only, no setuid, setgid or sticky.
pub const MAX_SOCKET_MODE: u32 = 0o777;

/// What is wrong with a configuration file or with the values in it.
///
/// The variants after [`ConfigError::Invalid`] are the validation rules; they name the key but
/// not the file, and [`Config::from_toml_str`] wraps them in [`ConfigError::Invalid`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // ---- the file ----
    /// The file asked for does not exist.
    #[error(
        "config file {} not found: create it (portgate's dist/portgate.toml lists every key with its default) \
         or leave --config out to run with the defaults",
        path.display()
    )]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but cannot be read.
    // `error` is not a `#[source]`: the message already carries it, and the CLI prints the
    // whole chain, which would say it twice.
    #[error(
        "cannot read config file {}: {error}; check that it is a readable file",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read returned.
        error: io::Error,
    },
    /// The file is not TOML.
    #[error(
        "{}: line {line}, column {column}: not valid TOML: {message}; fix the syntax there",
        path.display()
    )]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error (in characters), from 1.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// A section or key portgate does not know (usually a misspelling).
    #[error(
        "{}: unknown key {key} ({expected}); remove it or correct its spelling",
        path.display()
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// Full key path, e.g. `daemon.sockets`.
        key: String,
        /// The keys allowed there, e.g. "expected one of `state_dir`, `pin_dir`, ...".
        expected: String,
    },
    /// A value of the wrong type, or out of its type's range (e.g. a port above 65535).
    #[error(
        "{}: {key}: {message}; correct the value (portgate's dist/portgate.toml shows each key's type and default)",
        path.display()
    )]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// Full key path, e.g. `ports.min_port`.
        key: String,
        /// What the deserializer said, e.g. "invalid value: integer `70000`, expected u16".
        message: String,
    },
    /// The file parsed but breaks a validation rule (one of the variants below).
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The rule broken.
        problem: Box<ConfigError>,
    },

    // ---- [ports] ----
    /// `ports.min_port` is 0.
    #[error(
        "ports.min_port = 0: port 0 cannot be handed out (bind reads it as \"any port\"); set ports.min_port to 1 or more"
    )]
    MinPortZero,
    /// The range is empty.
    #[error(
        "ports.min_port = {min} is above ports.max_port = {max}: the range is empty; make ports.min_port at most ports.max_port"
    )]
    MinAboveMax {
        /// `ports.min_port`.
        min: u16,
        /// `ports.max_port`.
        max: u16,
    },
    /// A reserved port lies outside the managed range.
    #[error(
        "ports.reserved_ports: port {port} is outside ports.min_port..=ports.max_port ({min}-{max}); remove it or widen the range"
    )]
    ReservedOutsideRange {
        /// The reserved port.
        port: u16,
        /// `ports.min_port`.
        min: u16,
        /// `ports.max_port`.
        max: u16,
    },
    /// A port is listed twice in `ports.reserved_ports`.
    #[error("ports.reserved_ports: port {port} is listed more than once; remove the duplicate")]
    ReservedDuplicate {
        /// The port.
        port: u16,
    },
    /// `ports.reserved_ports` holds every port of the range.
    #[error(
        "ports.reserved_ports reserves every port of ports.min_port..=ports.max_port ({min}-{max}): \
         nothing is left to hand out; reserve fewer ports or widen the range"
    )]
    AllReserved {
        /// `ports.min_port`.
        min: u16,
        /// `ports.max_port`.
        max: u16,
    },
    /// `ports.timeout` is zero.
    #[error(
        "ports.timeout = 0s: draining ports need time to close their connections; set it above zero, e.g. \"30s\""
    )]
    ZeroTimeout,
    /// `ports.max_retries` is above [`MAX_RETRIES_LIMIT`].
    #[error(
        "ports.max_retries = {value} is above {MAX_RETRIES_LIMIT}: more random probes only delay the scan \
         of the free ports; lower it (the default is 32)"
    )]
    TooManyRetries {
        /// The value given.
        value: u32,
    },

    // ---- [daemon] ----
    /// `daemon.socket_mode` is not an octal string of permission bits.
    #[error(
        "daemon.socket_mode = {value:?}: {why}; write the permission bits in octal, e.g. \"0660\""
    )]
    BadSocketMode {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `daemon.cgroup` is neither `auto` nor an absolute path.
    #[error(
        "daemon.cgroup = {value:?}: neither \"auto\" nor an absolute path; write \"auto\" \
         (the cgroup2 mount) or the full path of a cgroup2 directory"
    )]
    BadCgroup {
        /// The value given.
        value: String,
    },
    /// A path that must be absolute is not.
    #[error(
        "{key} = {:?}: not an absolute path; write the full path, starting with /",
        path.display().to_string()
    )]
    RelativePath {
        /// Full key path, e.g. `daemon.state_dir`.
        key: &'static str,
        /// The value given.
        path: PathBuf,
    },
    /// `daemon.metrics_listen` is not a socket address.
    #[error(
        "daemon.metrics_listen = {value:?}: not an ip:port address ({error}); write e.g. \
         \"127.0.0.1:9477\" or \"[::1]:9477\", or \"\" to turn metrics off"
    )]
    BadMetricsListen {
        /// The value given.
        value: String,
        /// What the address parser said.
        error: std::net::AddrParseError,
    },
    /// `daemon.admin_group` is empty.
    #[error(
        "daemon.admin_group is empty: name the group whose members may administer portgate, e.g. \"portgate\""
    )]
    EmptyAdminGroup,
    /// An entry of `daemon.xdp_interfaces` cannot be an interface name.
    #[error(
        "daemon.xdp_interfaces: {name:?} {why}; write the interface's name as `ip link` shows it"
    )]
    BadInterface {
        /// The entry.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An interface is listed twice in `daemon.xdp_interfaces`.
    #[error("daemon.xdp_interfaces: {name:?} is listed more than once; remove the duplicate")]
    DuplicateInterface {
        /// The interface.
        name: String,
    },
}

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
        parse_socket_mode(&self.socket_mode)?;
        if self.cgroup != "auto" && !Path::new(&self.cgroup).is_absolute() {
            return Err(ConfigError::BadCgroup {
                value: self.cgroup.clone(),
            });
        }
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
        self.metrics_addr()?;
        if self.admin_group.trim().is_empty() {
            return Err(ConfigError::EmptyAdminGroup);
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

    /// The socket's permission bits, e.g. `0o660` for `"0660"`.
    ///
    /// # Panics
    ///
    /// If `socket_mode` is invalid: call this after [`DaemonConfig::validate`] (which
    /// [`Config::load`] runs).
    #[must_use]
    pub fn socket_mode_bits(&self) -> u32 {
        parse_socket_mode(&self.socket_mode).expect("validate() accepted daemon.socket_mode")
    }

    /// The Prometheus endpoint's address, `None` when `metrics_listen` is empty (metrics off).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.metrics_listen
            .parse()
            .map(Some)
            .map_err(|error| ConfigError::BadMetricsListen {
                value: self.metrics_listen.clone(),
                error,
            })
    }
}

/// Octal digits only: `u32::from_str_radix` alone would also take a sign ("+660").
fn parse_socket_mode(value: &str) -> Result<u32, ConfigError> {
    let bad = |why| ConfigError::BadSocketMode {
        value: value.to_owned(),
        why,
    };
    if value.is_empty() || !value.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad("not an octal number"));
    }
    match u32::from_str_radix(value, 8) {
        Ok(bits) if bits <= MAX_SOCKET_MODE => Ok(bits),
        _ => Err(bad(
            "above 0777 (only permission bits: no setuid, setgid or sticky bit)",
        )),
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
                    error,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ORIGIN: &str = "/etc/portgate/test.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new(ORIGIN))
    }

    /// The message of the error `text` gives, after checking it names the file and `key`
    /// and stays on one line.
    fn error_naming(text: &str, key: &str) -> String {
        let message = parse(text)
            .expect_err("the config should be refused")
            .to_string();
        assert!(message.starts_with(ORIGIN), "no file in: {message}");
        assert!(message.contains(key), "no {key} in: {message}");
        assert!(!message.contains('\n'), "more than one line: {message}");
        message
    }

    fn key_paths(table: &toml::Table) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for (name, value) in table {
            keys.insert(name.clone());
            if let toml::Value::Table(section) = value {
                keys.extend(section.keys().map(|key| format!("{name}.{key}")));
            }
        }
        keys
    }

    #[test]
    fn defaults_are_valid_without_warnings() {
        let config = Config::default();
        assert_eq!(config.validate().unwrap(), Vec::<String>::new());
        assert_eq!(config.ports.min_port, 20_000);
        assert_eq!(config.ports.max_port, 29_999);
        assert_eq!(config.ports.timeout, Duration::from_secs(30));
        assert_eq!(config.ports.quarantine, Duration::from_secs(10));
        assert_eq!(config.daemon.socket_mode_bits(), 0o660);
        assert_eq!(
            config.daemon.metrics_addr().unwrap(),
            Some("127.0.0.1:9477".parse().unwrap())
        );
    }

    #[test]
    fn dist_example_equals_the_defaults() {
        let text = include_str!("../../dist/portgate.toml");
        assert_eq!(
            Config::from_toml_str(text, Path::new("dist/portgate.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn dist_example_lists_every_key() {
        let example: toml::Table =
            toml::from_str(include_str!("../../dist/portgate.toml")).unwrap();
        let defaults: toml::Table =
            toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
        assert_eq!(key_paths(&example), key_paths(&defaults));
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn partial_file_keeps_the_other_defaults() {
        let config = parse(
            "[ports]\nmin_port = 40000\nmax_port = 40999\ntimeout = \"5m\"\n\
             [daemon]\nxdp_interfaces = [\"eth0\"]\n",
        )
        .unwrap();
        let mut expected = Config::default();
        expected.ports.min_port = 40_000;
        expected.ports.max_port = 40_999;
        expected.ports.timeout = Duration::from_mins(5);
        expected.daemon.xdp_interfaces = vec!["eth0".to_owned()];
        assert_eq!(config, expected);
    }

    #[test]
    fn unknown_section_is_named() {
        let message = error_naming("[portz]\nmin_port = 1\n", "unknown key portz");
        assert!(message.contains("`ports`"), "{message}");
    }

    #[test]
    fn unknown_key_in_section_is_named() {
        let message = error_naming(
            "[daemon]\nsockets = \"/run/x\"\n",
            "unknown key daemon.sockets",
        );
        assert!(message.contains("`socket`"), "{message}");
    }

    #[test]
    fn wrong_type_is_named() {
        error_naming(
            "[ports]\nmin_port = \"low\"\n",
            "ports.min_port: invalid type",
        );
        error_naming(
            "[ports]\nreserve_ephemeral = 1\n",
            "ports.reserve_ephemeral",
        );
        error_naming("ports = 3\n", "ports: invalid type");
    }

    #[test]
    fn port_above_u16_is_named() {
        let message = error_naming("[ports]\nmin_port = 70000\n", "ports.min_port");
        assert!(
            message.contains("70000") && message.contains("u16"),
            "{message}"
        );
    }

    #[test]
    fn bad_reserved_port_entry_is_named_with_its_index() {
        error_naming(
            "[ports]\nreserved_ports = [20001, -1]\n",
            "ports.reserved_ports[1]",
        );
    }

    #[test]
    fn bad_duration_is_named() {
        error_naming("[ports]\ntimeout = \"30 parsecs\"\n", "ports.timeout");
        error_naming("[ports]\nquarantine = 10\n", "ports.quarantine");
    }

    #[test]
    fn syntax_error_names_the_line() {
        error_naming("[ports]\nmin_port = = 1\n", "line 2, column");
        error_naming("[ports]\nmin_port = 1\nmin_port = 2\n", "line 3");
    }

    #[test]
    fn min_port_zero() {
        error_naming("[ports]\nmin_port = 0\n", "ports.min_port = 0");
    }

    #[test]
    fn min_port_above_max_port() {
        let message = error_naming(
            "[ports]\nmin_port = 30000\nmax_port = 20000\n",
            "ports.min_port = 30000",
        );
        assert!(message.contains("ports.max_port = 20000"), "{message}");
    }

    #[test]
    fn reserved_port_outside_the_range() {
        error_naming(
            "[ports]\nreserved_ports = [20001, 80]\n",
            "ports.reserved_ports: port 80 is outside",
        );
    }

    #[test]
    fn reserved_port_listed_twice() {
        error_naming(
            "[ports]\nreserved_ports = [20001, 20002, 20001]\n",
            "ports.reserved_ports: port 20001 is listed more than once",
        );
    }

    #[test]
    fn reserved_ports_covering_the_range() {
        let text =
            "[ports]\nmin_port = 20000\nmax_port = 20002\nreserved_ports = [20002, 20000, 20001]\n";
        error_naming(text, "ports.reserved_ports reserves every port");
        let one_left =
            "[ports]\nmin_port = 20000\nmax_port = 20002\nreserved_ports = [20002, 20000]\n";
        parse(one_left).unwrap();
    }

    #[test]
    fn whole_u16_range_is_accepted() {
        let config =
            parse("[ports]\nmin_port = 1\nmax_port = 65535\nreserved_ports = [1, 65535]\n")
                .unwrap();
        assert_eq!(
            config.validate().unwrap().len(),
            1,
            "the privileged-port warning"
        );
    }

    #[test]
    fn timeout_zero() {
        error_naming("[ports]\ntimeout = \"0s\"\n", "ports.timeout = 0s");
    }

    #[test]
    fn quarantine_zero_is_allowed() {
        let config = parse("[ports]\nquarantine = \"0s\"\n").unwrap();
        assert_eq!(config.ports.quarantine, Duration::ZERO);
    }

    #[test]
    fn max_retries_too_high() {
        error_naming(
            "[ports]\nmax_retries = 1000001\n",
            "ports.max_retries = 1000001",
        );
        parse("[ports]\nmax_retries = 1000000\n").unwrap();
    }

    #[test]
    fn privileged_min_port_is_a_warning() {
        let config = parse("[ports]\nmin_port = 80\nmax_port = 90\n").unwrap();
        let warnings = config.validate().unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("ports.min_port = 80: ports below 1024 are privileged"));
        assert_eq!(config.ports.validate().unwrap(), warnings);
    }

    #[test]
    fn port_config_validate_names_the_key_without_a_file() {
        let ports = PortConfig {
            min_port: 0,
            ..PortConfig::default()
        };
        let message = ports.validate().unwrap_err().to_string();
        assert!(message.starts_with("ports.min_port = 0:"), "{message}");
    }

    #[test]
    fn socket_mode_not_octal() {
        for bad in ["rw-rw----", "0968", "+660", "", "0o660"] {
            let text = format!("[daemon]\nsocket_mode = {bad:?}\n");
            error_naming(&text, "daemon.socket_mode");
        }
    }

    #[test]
    fn socket_mode_above_permission_bits() {
        let message = error_naming("[daemon]\nsocket_mode = \"4770\"\n", "daemon.socket_mode");
        assert!(message.contains("above 0777"), "{message}");
        error_naming("[daemon]\nsocket_mode = \"77777777777777\"\n", "above 0777");
    }

    #[test]
    fn socket_mode_bits_reads_octal() {
        let config = parse("[daemon]\nsocket_mode = \"600\"\n").unwrap();
        assert_eq!(config.daemon.socket_mode_bits(), 0o600);
        let config = parse("[daemon]\nsocket_mode = \"0777\"\n").unwrap();
        assert_eq!(config.daemon.socket_mode_bits(), 0o777);
    }

    #[test]
    fn cgroup_must_be_auto_or_absolute() {
        error_naming("[daemon]\ncgroup = \"sys/fs/cgroup\"\n", "daemon.cgroup");
        error_naming("[daemon]\ncgroup = \"\"\n", "daemon.cgroup");
        error_naming("[daemon]\ncgroup = \"Auto\"\n", "daemon.cgroup");
        parse("[daemon]\ncgroup = \"/sys/fs/cgroup/portgate.slice\"\n").unwrap();
    }

    #[test]
    fn paths_must_be_absolute() {
        for key in ["state_dir", "pin_dir", "socket", "audit_log"] {
            for bad in ["var/lib/portgate", ""] {
                let text = format!("[daemon]\n{key} = {bad:?}\n");
                error_naming(
                    &text,
                    &format!("daemon.{key} = {bad:?}: not an absolute path"),
                );
            }
        }
    }

    #[test]
    fn metrics_listen_must_be_a_socket_address() {
        for bad in ["localhost:9477", "127.0.0.1", ":9477", "::1:9477"] {
            let text = format!("[daemon]\nmetrics_listen = {bad:?}\n");
            error_naming(&text, "daemon.metrics_listen");
        }
    }

    #[test]
    fn metrics_listen_empty_or_ipv6() {
        let off = parse("[daemon]\nmetrics_listen = \"\"\n").unwrap();
        assert_eq!(off.daemon.metrics_addr().unwrap(), None);
        let v6 = parse("[daemon]\nmetrics_listen = \"[::1]:9477\"\n").unwrap();
        assert_eq!(
            v6.daemon.metrics_addr().unwrap(),
            Some("[::1]:9477".parse().unwrap())
        );
    }

    #[test]
    fn admin_group_empty() {
        error_naming("[daemon]\nadmin_group = \"\"\n", "daemon.admin_group");
        error_naming("[daemon]\nadmin_group = \"  \"\n", "daemon.admin_group");
    }

    #[test]
    fn xdp_interface_empty() {
        error_naming(
            "[daemon]\nxdp_interfaces = [\"eth0\", \"\"]\n",
            "daemon.xdp_interfaces: \"\" is empty",
        );
    }

    #[test]
    fn xdp_interface_too_long() {
        let message = error_naming(
            "[daemon]\nxdp_interfaces = [\"abcdefghijklmnop\"]\n",
            "daemon.xdp_interfaces: \"abcdefghijklmnop\"",
        );
        assert!(message.contains("15 bytes"), "{message}");
        parse("[daemon]\nxdp_interfaces = [\"abcdefghijklmno\"]\n").unwrap();
    }

    #[test]
    fn xdp_interface_not_a_name() {
        for bad in ["eth/0", "eth0:1", "eth 0", ".."] {
            let text = format!("[daemon]\nxdp_interfaces = [{bad:?}]\n");
            error_naming(&text, "daemon.xdp_interfaces");
        }
    }

    #[test]
    fn xdp_interface_listed_twice() {
        error_naming(
            "[daemon]\nxdp_interfaces = [\"eth0\", \"eth1\", \"eth0\"]\n",
            "daemon.xdp_interfaces: \"eth0\" is listed more than once",
        );
    }

    #[test]
    fn load_reads_and_validates_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portgate.toml");
        std::fs::write(&path, "[ports]\nmin_port = 21000\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().ports.min_port, 21_000);

        std::fs::write(&path, "[ports]\nmin_port = 0\n").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}: ports.min_port = 0:", path.display())),
            "{message}"
        );
    }

    #[test]
    fn load_or_default_with_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        assert_eq!(
            Config::load_or_default(&path, false).unwrap(),
            Config::default()
        );
        let error = Config::load_or_default(&path, true).unwrap_err();
        assert!(matches!(error, ConfigError::NotFound { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("config file {} not found:", path.display())),
            "{error}"
        );
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::NotFound { .. })
        ));
    }

    #[test]
    fn load_or_default_reads_an_existing_file_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portgate.toml");
        std::fs::write(&path, "[daemon]\nadmin_group = \"wheel\"\n").unwrap();
        for explicit in [false, true] {
            let config = Config::load_or_default(&path, explicit).unwrap();
            assert_eq!(config.daemon.admin_group, "wheel");
        }
        std::fs::write(&path, "[daemon]\nadmin_group = \"\"\n").unwrap();
        assert!(
            Config::load_or_default(&path, false).is_err(),
            "a bad file is never skipped"
        );
    }

    #[test]
    fn unreadable_path_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = Config::load(dir.path()).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }
}
