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
    /// The address the grant is for (a key made with `--any-source` only); `None`: the
    /// address the datagram arrives from.
    pub address: Option<IpAddr>,
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
    let sent = Knock {
        key_name: key_file.name.clone(),
        protocol: request.protocol,
        port: request.port,
        ttl: request.ttl,
        timestamp,
        nonce: rand::random(),
        address: request.address,
    };
    let datagram = encode(&sent, &key_file.key)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let local: SocketAddr = match listener {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.send_to(&datagram, listener)?;
    Ok(sent)
}
