//! The client side: knocking from a program, so that it can knock and then connect.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{Knock, encode, keyfile::KeyFile};
use crate::model::Protocol;

/// What to knock for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnockRequest {
    /// The port's protocol.
    pub protocol: Protocol,
    /// The port to open.
    pub port: u16,
    /// How long the grant should last (whole seconds; the key's most caps it).
    pub ttl: Duration,
    /// The address the grant is for.
    pub grant_for: GrantFor,
}

/// Which address a knock asks its grant for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrantFor {
    /// This host's own address on the way to the listener, signed: a datagram held back on
    /// the way cannot be used from another address. The default.
    #[default]
    ThisHost,
    /// The address the datagram arrives from, unsigned: for a client behind a NAT whose
    /// key does not allow any source. Weaker: whoever holds the datagram back and sends it
    /// first gets the grant.
    Arrival,
    /// This address, signed (a key made with `--any-source` only): a client behind a NAT
    /// names its public address.
    Address(IpAddr),
}

/// Sends one knock for `request`, signed with `key_file`, to the daemon's knock listener
/// at `listener`; returns what it sent. The daemon never answers: connect to the port to
/// learn whether it worked.
pub fn knock(
    listener: SocketAddr,
    key_file: &KeyFile,
    request: &KnockRequest,
) -> io::Result<Knock> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| io::Error::other("the clock is before 1970"))?
        .as_secs();
    let local: SocketAddr = match listener {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connecting a UDP socket sends nothing; it picks the route, and so this host's address.
    socket.connect(listener)?;
    let address = match request.grant_for {
        GrantFor::ThisHost => Some(socket.local_addr()?.ip().to_canonical()),
        GrantFor::Arrival => None,
        GrantFor::Address(addr) => Some(addr),
    };
    let sent = Knock {
        key_name: key_file.name.clone(),
        protocol: request.protocol,
        port: request.port,
        ttl: request.ttl,
        timestamp,
        nonce: rand::random(),
        address,
    };
    let datagram = encode(&sent, &key_file.key)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    socket.send(&datagram)?;
    Ok(sent)
}
