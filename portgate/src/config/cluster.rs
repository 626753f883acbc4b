//! `[cluster]`: fleet mode. Hosts share one allocation space and one policy through etcd;
//! without this section the daemon keeps everything in its own store (redb).

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The most etcd endpoints listed.
pub const MAX_ENDPOINTS: usize = 16;

/// The longest node name.
pub const MAX_NODE_NAME: usize = 63;

/// `[cluster]`: the etcd cluster this node shares its ports and policy through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd's client URLs (`http://host:2379`, or `https://` with TLS).
    pub etcd: Vec<String>,
    /// This node's name in the fleet: unique, 1 to 63 ASCII letters, digits, `.`, `_` or
    /// `-`. Defaults to the host's name.
    #[serde(default)]
    pub node: Option<String>,
    /// The prefix of every key portgate writes in etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// etcd user (with `password_file`), when etcd has authentication on.
    #[serde(default)]
    pub username: Option<String>,
    /// A root-only file holding that user's password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed etcd's server certificates; with it the
    /// endpoints must be `https://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This node's client certificate (PEM), for etcd's client certificate authentication.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// That certificate's private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long one request to etcd may take before it fails (and the change with it).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The lease of this node's liveness key: how long after the node stops the fleet
    /// sees it gone.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

fn default_prefix() -> String {
    "/portgate".to_owned()
}

const fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

const fn default_lease() -> Duration {
    Duration::from_secs(10)
}

impl ClusterConfig {
    /// A cluster of `endpoints` with every other setting at its default.
    #[must_use]
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            etcd: endpoints,
            node: None,
            prefix: default_prefix(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: default_timeout(),
            lease: default_lease(),
        }
    }

    /// Checks every rule of the section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, why: String| Err(ConfigError::Cluster { key, why });
        if self.etcd.is_empty() || self.etcd.len() > MAX_ENDPOINTS {
            return bad(
                "cluster.etcd",
                format!(
                    "list 1 to {MAX_ENDPOINTS} etcd client URLs, e.g. [\"http://10.0.0.1:2379\"]"
                ),
            );
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        for endpoint in &self.etcd {
            let scheme = endpoint.split_once("://").map(|(scheme, _)| scheme);
            let rest = endpoint.split_once("://").map_or("", |(_, rest)| rest);
            let wanted = if tls { "https" } else { "http" };
            if scheme != Some(wanted) || rest.is_empty() || rest.contains(['/', ' ']) {
                return bad(
                    "cluster.etcd",
                    format!(
                        "{endpoint:?} is not a {wanted}://HOST:PORT URL ({})",
                        if tls {
                            "TLS is on: ca_file or cert_file is set"
                        } else {
                            "set ca_file for https"
                        }
                    ),
                );
            }
        }
        if let Some(node) = &self.node
            && !valid_node_name(node)
        {
            return bad(
                "cluster.node",
                format!("{node:?}: 1 to {MAX_NODE_NAME} ASCII letters, digits, '.', '_' or '-'"),
            );
        }
        if !self.prefix.starts_with('/')
            || self.prefix.ends_with('/')
            || self.prefix.len() > 128
            || self.prefix.contains(char::is_whitespace)
        {
            return bad(
                "cluster.prefix",
                format!(
                    "{:?}: a key prefix starting with '/', not ending with one, without spaces, at most 128 bytes (the default is \"/portgate\")",
                    self.prefix
                ),
            );
        }
        if self.username.is_some() != self.password_file.is_some() {
            return bad(
                "cluster.username",
                "set username and password_file together, or neither".to_owned(),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad(
                "cluster.cert_file",
                "set cert_file and key_file together, or neither".to_owned(),
            );
        }
        for (key, path) in [
            ("cluster.password_file", &self.password_file),
            ("cluster.ca_file", &self.ca_file),
            ("cluster.cert_file", &self.cert_file),
            ("cluster.key_file", &self.key_file),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(ConfigError::RelativePath {
                    key,
                    path: path.clone(),
                });
            }
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_mins(1) {
            return bad(
                "cluster.timeout",
                format!(
                    "{}: between 100ms and 1m (the default is \"5s\")",
                    humantime::format_duration(self.timeout)
                ),
            );
        }
        if self.lease < Duration::from_secs(2) || self.lease > Duration::from_mins(5) {
            return bad(
                "cluster.lease",
                format!(
                    "{}: between 2s and 5m, whole seconds (the default is \"10s\")",
                    humantime::format_duration(self.lease)
                ),
            );
        }
        Ok(())
    }

    /// This node's name: `node`, else the host's name.
    pub fn node_name(&self) -> Result<String, ConfigError> {
        if let Some(node) = &self.node {
            return Ok(node.clone());
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_default();
        if valid_node_name(&host) {
            Ok(host)
        } else {
            Err(ConfigError::Cluster {
                key: "cluster.node",
                why: format!(
                    "not set, and the host's name {host:?} cannot be one: set it (1 to {MAX_NODE_NAME} ASCII letters, digits, '.', '_' or '-')"
                ),
            })
        }
    }
}

/// Whether `name` can name a node.
#[must_use]
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
