//! Who may connect to a port: its [`PortAccessControl`], and the [`AccessChange`] that
//! patches it.

use std::net::IpAddr;

use indexmap::IndexSet;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A port's allowlist: the source prefixes allowed to connect; empty allows every source.
///
/// A set: each prefix is kept once, truncated to its network (`10.0.0.9/8` is
/// `10.0.0.0/8`), so finding a prefix costs the same however long the
/// list is. Prefixes keep the order they were added in, which is the order the API shows.
/// Two allowlists are equal when they hold the same prefixes, in any order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Allowlist(IndexSet<IpNet>);

/// As serde spells it: a list of prefixes (`10.0.0.0/8`, `2001:db8::/32`, or an address).
impl utoipa::PartialSchema for Allowlist {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .description(Some("An IPv4 or IPv6 prefix, or an address")),
            )
            .examples([serde_json::json!(["10.0.0.0/8", "2001:db8::/32"])])
            .into()
    }
}

impl ToSchema for Allowlist {}

impl Allowlist {
    /// How many prefixes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no prefix (every source is allowed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The prefixes, in the order they were added.
    #[must_use]
    pub fn iter(&self) -> indexmap::set::Iter<'_, IpNet> {
        self.0.iter()
    }

    /// Whether it holds `prefix` (truncated to its network first).
    #[must_use]
    pub fn contains(&self, prefix: &IpNet) -> bool {
        self.0.contains(&prefix.trunc())
    }

    /// Whether `addr` falls in one of its prefixes (of its own address family).
    ///
    /// A scan: the kernel keeps the same prefixes in an LPM trie, and userspace asks this
    /// only for `portgate check`.
    #[must_use]
    pub fn covers(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|prefix| prefix.contains(&addr))
    }
}

impl FromIterator<IpNet> for Allowlist {
    fn from_iter<I: IntoIterator<Item = IpNet>>(prefixes: I) -> Self {
        Self(prefixes.into_iter().map(|prefix| prefix.trunc()).collect())
    }
}

impl Extend<IpNet> for Allowlist {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, prefixes: I) {
        self.0
            .extend(prefixes.into_iter().map(|prefix| prefix.trunc()));
    }
}

impl<'a> IntoIterator for &'a Allowlist {
    type Item = &'a IpNet;
    type IntoIter = indexmap::set::Iter<'a, IpNet>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for Allowlist {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<IpNet>::deserialize(deserializer).map(Self::from_iter)
    }
}

/// The specification's access control of a port: the one shape of a port's access rules
/// on every layer (the store's record, the kernel policy, the views).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAccessControl {
    /// Source prefixes allowed to connect; empty allows every source.
    pub allowed_ips: Allowlist,
    /// Most TCP connections at once; 0 is unlimited (and the only value a UDP port takes).
    pub max_connections: u32,
    /// New connections need an unexpired authentication grant for their source.
    pub require_authentication: bool,
}

/// A change to a port's access control: a patch of [`PortAccessControl`]. What is `None`
/// (or an empty list) stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AccessChange {
    /// Prefixes to add to the allowlist.
    pub allow: Allowlist,
    /// Prefixes to take out of the allowlist.
    pub remove: Allowlist,
    /// A new connection limit (0 is unlimited). `max_conns` is accepted too, as in an
    /// allocation request.
    #[serde(alias = "max_conns")]
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub max_connections: Option<u32>,
    /// Whether new connections need a grant. `require_auth` is accepted too.
    #[serde(alias = "require_auth")]
    pub require_authentication: Option<bool>,
}

impl AccessChange {
    /// `access` with this change made, in one pass over its allowlist; `Err` names a
    /// prefix to remove that `access` does not hold (then nothing is changed).
    pub fn apply(&self, access: &PortAccessControl) -> Result<PortAccessControl, IpNet> {
        if let Some(absent) = self
            .remove
            .iter()
            .find(|prefix| !access.allowed_ips.contains(prefix))
        {
            return Err(*absent);
        }
        let mut changed = access.clone();
        changed
            .allowed_ips
            .0
            .retain(|prefix| !self.remove.0.contains(prefix));
        changed.allowed_ips.extend(self.allow.iter().copied());
        if let Some(max) = self.max_connections {
            changed.max_connections = max;
        }
        if let Some(required) = self.require_authentication {
            changed.require_authentication = required;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(prefixes: &[&str]) -> Allowlist {
        prefixes.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn an_allowlist_holds_each_network_once_in_the_order_added() {
        let allow = list(&["10.0.0.9/8", "2001:db8::/32", "10.1.2.3/8"]);
        assert_eq!(allow.len(), 2);
        assert_eq!(
            serde_json::to_string(&allow).unwrap(),
            r#"["10.0.0.0/8","2001:db8::/32"]"#
        );
        assert!(allow.contains(&"10.200.0.0/8".parse().unwrap()));
        assert!(allow.covers("10.9.9.9".parse().unwrap()));
        assert!(!allow.covers("::ffff:10.9.9.9".parse().unwrap()));
        assert_eq!(allow, list(&["2001:db8::/32", "10.0.0.0/8"]), "a set");
    }

    #[test]
    fn a_change_adds_removes_and_refuses_what_is_not_there() {
        let access = PortAccessControl {
            allowed_ips: list(&["10.0.0.0/8", "192.0.2.0/24"]),
            ..PortAccessControl::default()
        };
        let change = AccessChange {
            allow: list(&["198.51.100.7/24"]),
            remove: list(&["10.0.0.0/8"]),
            max_connections: Some(3),
            require_authentication: None,
        };
        let changed = change.apply(&access).unwrap();
        assert_eq!(
            changed.allowed_ips,
            list(&["192.0.2.0/24", "198.51.100.0/24"])
        );
        assert_eq!(changed.max_connections, 3);
        let absent = AccessChange {
            remove: list(&["203.0.113.0/24"]),
            ..AccessChange::default()
        };
        assert_eq!(
            absent.apply(&access),
            Err("203.0.113.0/24".parse().unwrap())
        );
    }

    #[test]
    fn an_access_change_takes_the_names_of_an_allocation_request_too() {
        let short: AccessChange =
            serde_json::from_str(r#"{"max_conns": 3, "require_auth": true}"#).unwrap();
        let long: AccessChange =
            serde_json::from_str(r#"{"max_connections": 3, "require_authentication": true}"#)
                .unwrap();
        assert_eq!(short, long);
        assert_eq!(short.max_connections, Some(3));
    }
}
