//! The values with a shape of their own, typed when the file is parsed: the cgroup to attach
//! to ([`CgroupTarget`]), the socket's permission bits ([`SocketMode`]), the metrics address
//! ([`metrics_listen`]) and what a port does when its owner goes ([`OwnerExit`]). Each is a
//! string in the file, and serializes back to the string it was read from (up to spelling:
//! "600" comes back as "0600").

use std::{
    fmt,
    net::AddrParseError,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// What to do about a bad value of `key`, for the keys whose values are typed here (a
/// value of the wrong type included); `None` for other keys.
#[must_use]
pub fn advice(key: &str) -> Option<&'static str> {
    match key {
        "daemon.cgroup" => {
            Some("write \"auto\" (the cgroup2 mount) or the full path of a cgroup2 directory")
        }
        "daemon.socket_mode" => Some("write the permission bits in octal, e.g. \"0660\""),
        "daemon.metrics_listen" => {
            Some("write e.g. \"127.0.0.1:9477\" or \"[::1]:9477\", or \"\" to turn metrics off")
        }
        "ports.on_owner_exit" => Some("write \"drain\" or \"keep\""),
        _ => None,
    }
}

/// What happens to an Active port whose owner cgroup is removed (`ports.on_owner_exit`).
/// Either way `status` counts the port among those whose owner is gone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerExit {
    /// `"drain"`: the port goes Draining, as when its lease runs out.
    #[default]
    Drain,
    /// `"keep"`: the port stays Active, for an owner that comes back in a new cgroup (a
    /// restarted container) and is handed the port with `PATCH /v1/ports/{port}/owner`.
    Keep,
}

/// The highest [`SocketMode`]: permission bits only, no setuid, setgid or sticky.
pub const MAX_SOCKET_MODE: u32 = 0o777;

/// What is wrong with one of these values. The message says neither the file nor the key:
/// [`Config::from_toml_str`](super::Config::from_toml_str) reports it as a
/// [`ConfigError::InvalidValue`](super::ConfigError::InvalidValue), which names both.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// `daemon.cgroup` is neither `auto` nor an absolute path.
    #[error("{value:?} is neither \"auto\" nor an absolute path")]
    BadCgroup {
        /// The value given.
        value: String,
    },
    /// `daemon.socket_mode` is not an octal string of permission bits.
    #[error("{value:?} is {why}")]
    BadSocketMode {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `daemon.metrics_listen` is neither empty nor a socket address.
    #[error("{value:?} is not an ip:port address")]
    BadMetricsListen {
        /// The value given.
        value: String,
        /// What the address parser said.
        #[source]
        source: AddrParseError,
    },
}

/// The cgroup2 directory the bind and connection programs attach to (`daemon.cgroup`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupTarget {
    /// `"auto"`: the cgroup2 mount, found in `/proc/self/mounts` when the daemon starts.
    #[default]
    Auto,
    /// A cgroup2 directory, by its absolute path.
    Path(PathBuf),
}

impl CgroupTarget {
    /// How the file spells [`CgroupTarget::Auto`].
    const AUTO: &'static str = "auto";
}

impl FromStr for CgroupTarget {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        if text == Self::AUTO {
            Ok(Self::Auto)
        } else if Path::new(text).is_absolute() {
            Ok(Self::Path(PathBuf::from(text)))
        } else {
            Err(ValueError::BadCgroup {
                value: text.to_owned(),
            })
        }
    }
}

impl Serialize for CgroupTarget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => serializer.serialize_str(Self::AUTO),
            // PathBuf's own impl: a path that is not UTF-8 is an error, not a lossy string.
            Self::Path(path) => path.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for CgroupTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_string(deserializer)
    }
}

/// The API socket's permission bits (`daemon.socket_mode`), written in octal, e.g. "0660".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// The bits, e.g. `0o660`; never above [`MAX_SOCKET_MODE`].
    #[must_use]
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    /// "0660": root and the admin group only.
    fn default() -> Self {
        Self(0o660)
    }
}

impl FromStr for SocketMode {
    type Err = ValueError;

    /// Octal digits only: `u32::from_str_radix` alone would also take a sign ("+660").
    fn from_str(text: &str) -> Result<Self, ValueError> {
        let bad = |why| ValueError::BadSocketMode {
            value: text.to_owned(),
            why,
        };
        if text.is_empty() || !text.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad("not an octal number"));
        }
        match u32::from_str_radix(text, 8) {
            Ok(bits) if bits <= MAX_SOCKET_MODE => Ok(Self(bits)),
            _ => Err(bad(
                "above 0777 (only permission bits: no setuid, setgid or sticky bit)",
            )),
        }
    }
}

impl fmt::Display for SocketMode {
    /// Four octal digits, as `chmod` and the file write them: "0660".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_string(deserializer)
    }
}

/// `daemon.metrics_listen` as an `Option<SocketAddr>` (`#[serde(with)]`): `""` is `None`,
/// metrics off; anything else must be an ip:port address.
pub mod metrics_listen {
    use std::net::SocketAddr;

    use serde::{Deserializer, Serializer};

    use super::ValueError;

    /// Parses the file's spelling: `""` is `None`.
    pub fn parse(text: &str) -> Result<Option<SocketAddr>, ValueError> {
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|source| ValueError::BadMetricsListen {
                value: text.to_owned(),
                source,
            })
    }

    /// Writes `None` as `""`.
    #[expect(
        clippy::ref_option,
        reason = "#[serde(with)] hands the field over by reference"
    )]
    pub fn serialize<S: Serializer>(
        address: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_str(""),
        }
    }

    /// Reads a string and [`parse`]s it.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        super::parse_string_with(deserializer, parse)
    }
}

/// Reads a string and parses it as `T`.
fn parse_string<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: FromStr<Err = ValueError>,
    D: Deserializer<'de>,
{
    parse_string_with(deserializer, str::parse)
}

/// Reads a string and parses it with `parse`. serde keeps only the message of the
/// [`ValueError`]; what to do is the key's [`advice`].
fn parse_string_with<'de, T, D>(
    deserializer: D,
    parse: impl FnOnce(&str) -> Result<T, ValueError>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    parse(&String::deserialize(deserializer)?).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    #[test]
    fn cgroup_target_is_auto_or_an_absolute_path() {
        assert_eq!("auto".parse::<CgroupTarget>().unwrap(), CgroupTarget::Auto);
        assert_eq!(
            "/sys/fs/cgroup/portgate.slice"
                .parse::<CgroupTarget>()
                .unwrap(),
            CgroupTarget::Path(PathBuf::from("/sys/fs/cgroup/portgate.slice"))
        );
        for bad in ["sys/fs/cgroup", "", "Auto", "./auto"] {
            let error = bad.parse::<CgroupTarget>().unwrap_err();
            assert!(
                matches!(&error, ValueError::BadCgroup { value } if value == bad),
                "{error:?}"
            );
            assert!(
                error
                    .to_string()
                    .contains("neither \"auto\" nor an absolute path"),
                "{error}"
            );
        }
    }

    #[test]
    fn socket_mode_reads_octal_permission_bits() {
        assert_eq!("600".parse::<SocketMode>().unwrap().bits(), 0o600);
        assert_eq!("0777".parse::<SocketMode>().unwrap().bits(), 0o777);
        assert_eq!("0".parse::<SocketMode>().unwrap().bits(), 0);
        assert_eq!(SocketMode::default().bits(), 0o660);
    }

    #[test]
    fn socket_mode_refuses_what_is_not_octal() {
        for bad in ["rw-rw----", "0968", "+660", "", "0o660", " 660"] {
            let message = bad.parse::<SocketMode>().unwrap_err().to_string();
            assert!(message.contains("not an octal number"), "{message}");
        }
    }

    #[test]
    fn socket_mode_refuses_more_than_permission_bits() {
        for bad in ["4770", "1000", "77777777777777"] {
            let message = bad.parse::<SocketMode>().unwrap_err().to_string();
            assert!(message.contains("above 0777"), "{message}");
        }
    }

    #[test]
    fn socket_mode_displays_four_octal_digits() {
        for (text, shown) in [("0660", "0660"), ("600", "0600"), ("7", "0007")] {
            assert_eq!(text.parse::<SocketMode>().unwrap().to_string(), shown);
        }
    }

    #[test]
    fn metrics_listen_is_empty_or_a_socket_address() {
        assert_eq!(metrics_listen::parse("").unwrap(), None);
        assert_eq!(
            metrics_listen::parse("127.0.0.1:9477").unwrap(),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9477)))
        );
        assert_eq!(
            metrics_listen::parse("[::1]:9477").unwrap(),
            Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 9477)))
        );
        for bad in ["localhost:9477", "127.0.0.1", ":9477", "::1:9477", " "] {
            let error = metrics_listen::parse(bad).unwrap_err();
            assert!(
                matches!(&error, ValueError::BadMetricsListen { value, .. } if value == bad),
                "{error:?}"
            );
            assert!(
                std::error::Error::source(&error).is_some(),
                "the address parser's error is kept: {error:?}"
            );
        }
    }

    /// One key of each type, the way `[daemon]` holds them.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Values {
        cgroup: CgroupTarget,
        socket_mode: SocketMode,
        #[serde(with = "metrics_listen")]
        metrics_listen: Option<SocketAddr>,
    }

    #[test]
    fn values_serialize_back_to_the_file_spelling() {
        for text in [
            "cgroup = \"auto\"\nsocket_mode = \"0660\"\nmetrics_listen = \"127.0.0.1:9477\"\n",
            "cgroup = \"/sys/fs/cgroup/a b\"\nsocket_mode = \"0000\"\nmetrics_listen = \"\"\n",
            "cgroup = \"/x\"\nsocket_mode = \"0777\"\nmetrics_listen = \"[::1]:9477\"\n",
        ] {
            let values: Values = toml::from_str(text).unwrap();
            assert_eq!(toml::to_string(&values).unwrap(), text);
        }
    }

    #[test]
    fn a_refused_value_keeps_its_message_through_serde() {
        let error = toml::from_str::<Values>(
            "cgroup = \"auto\"\nsocket_mode = \"4770\"\nmetrics_listen = \"\"\n",
        )
        .unwrap_err();
        assert!(
            error.message().starts_with("\"4770\" is above 0777"),
            "{error}"
        );
    }
}
