//! The fleet's key layout in etcd (see the module above).

use crate::model::{PortId, Protocol};

use super::FleetError;

/// The keys of one fleet range: `<prefix>/<min>-<max>/...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetKeys {
    root: String,
}

impl FleetKeys {
    /// The keys under `prefix` for the range `min..=max`.
    #[must_use]
    pub fn new(prefix: &str, (min, max): (u16, u16)) -> Self {
        Self {
            root: format!("{prefix}/{min}-{max}"),
        }
    }

    /// The prefix of every allocation's key.
    #[must_use]
    pub fn alloc_prefix(&self) -> String {
        format!("{}/alloc/", self.root)
    }

    /// The key of `id`'s allocation. Fleet ports are the host's: another namespace is one
    /// node's own.
    pub fn alloc(&self, id: PortId) -> Result<String, FleetError> {
        if !id.netns.is_host() {
            return Err(FleetError::Config(format!(
                "{id} is in a network namespace of this node: a fleet port is the host's"
            )));
        }
        Ok(format!(
            "{}{}/{}",
            self.alloc_prefix(),
            id.protocol,
            id.port
        ))
    }

    /// The port an allocation's key names.
    pub fn port_of(&self, key: &[u8]) -> Result<PortId, FleetError> {
        let text = String::from_utf8_lossy(key);
        let corrupt = || FleetError::Corrupt {
            key: text.clone().into_owned(),
            message: "not <prefix>/<range>/alloc/<proto>/<port>".to_owned(),
        };
        let rest = text
            .strip_prefix(&self.alloc_prefix())
            .ok_or_else(corrupt)?;
        let (proto, port) = rest.split_once('/').ok_or_else(corrupt)?;
        let protocol: Protocol = proto.parse().map_err(|_| corrupt())?;
        let port: u16 = port.parse().map_err(|_| corrupt())?;
        Ok(PortId::new(port, protocol))
    }

    /// The prefix of the nodes' liveness keys.
    #[must_use]
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.root)
    }

    /// The liveness key of `node`.
    #[must_use]
    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes_prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::FleetKeys;
    use crate::model::{PortId, Protocol};

    #[test]
    fn keys_name_the_range_and_the_port_and_read_back() {
        let keys = FleetKeys::new("/portgate", (20_000, 29_999));
        let id = PortId::new(20_001, Protocol::Udp);
        let key = keys.alloc(id).unwrap();
        assert_eq!(key, "/portgate/20000-29999/alloc/udp/20001");
        assert_eq!(keys.port_of(key.as_bytes()).unwrap(), id);
        assert!(keys.port_of(b"/portgate/20000-29999/alloc/sctp/1").is_err());
        assert!(keys.port_of(b"/elsewhere/alloc/tcp/1").is_err());
        assert_eq!(keys.node("a"), "/portgate/20000-29999/nodes/a");
    }
}
