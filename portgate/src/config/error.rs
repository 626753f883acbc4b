//! [`ConfigError`]: what is wrong with a configuration file or with the values in it.

use std::{io, path::PathBuf};

use super::MAX_RETRIES_LIMIT;

/// What is wrong with a configuration file or with the values in it.
///
/// The variants after [`ConfigError::Invalid`] are the validation rules; they name the key but
/// not the file, and [`Config::from_toml_str`](super::Config::from_toml_str) wraps them in
/// [`ConfigError::Invalid`].
///
/// A variant that wraps a cause keeps it as its `source` and leaves it out of its own
/// message: the CLI prints the whole chain on one line (`message: cause`), which would
/// otherwise say the cause twice.
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
    #[error(
        "cannot read config file {} (check that it is a readable file)",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read returned.
        #[source]
        source: io::Error,
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
    /// A value of the wrong type, out of its type's range (e.g. a port above 65535), or
    /// refused by its type's parser (a [`ValueError`](super::ValueError)).
    #[error("{}: {key}: {message}; {advice}", path.display())]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// Full key path, e.g. `ports.min_port`.
        key: String,
        /// What the deserializer said, e.g. "invalid value: integer `70000`, expected u16".
        /// Only text: serde passes a value's error on as its message.
        message: String,
        /// What to do: the key's own rule where its type has one
        /// (`config::values::advice`), else to look up the key's type.
        advice: &'static str,
    },
    /// The file parsed but breaks a validation rule (one of the variants below), which
    /// follows the file's name in the chain.
    #[error("{}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The rule broken.
        #[source]
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
    /// `auth.window` is under a second or over an hour.
    #[error(
        "auth.window = {}: a knock's timestamp must be allowed between 1s and 1h from the daemon's clock; the default is \"30s\"",
        humantime::format_duration(*value)
    )]
    KnockWindow {
        /// The value given.
        value: std::time::Duration,
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
    /// `daemon.audit_max_bytes` is outside [`super::AUDIT_MAX_BYTES_RANGE`].
    #[error(
        "daemon.audit_max_bytes = {value}: the audit log's rotation size must be between 4096 (4 KiB) and 1099511627776 (1 TiB); the default is 67108864 (64 MiB)"
    )]
    AuditMaxBytes {
        /// The value given.
        value: u64,
    },
    /// `daemon.audit_keep` is outside [`super::AUDIT_KEEP_RANGE`].
    #[error(
        "daemon.audit_keep = {value}: keep between 1 and 100 rotated audit logs; the default is 5"
    )]
    AuditKeep {
        /// The value given.
        value: u32,
    },
    /// A `[cluster]` setting breaks its rule.
    #[error("{key}: {why}")]
    Cluster {
        /// Full key path, e.g. `cluster.etcd`.
        key: &'static str,
        /// What is wrong and what to write instead.
        why: String,
    },
    /// An interface is listed twice in `daemon.xdp_interfaces`.
    #[error("daemon.xdp_interfaces: {name:?} is listed more than once; remove the duplicate")]
    DuplicateInterface {
        /// The interface.
        name: String,
    },
}
