//! A slot is given back only when the kernel closes the connection: forged RSTs and FINs
//! whose sequence numbers are wrong (out of the window, or in it but not where the
//! connection is) never free one, and a half-closed connection keeps its slot until both
//! sides have closed. (Calico's connection limit had both bugs.)

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use portgate_common::reason;
use portgate_tests::{
    common::{REFUSED_WITHIN, echo, eventually},
    require_privileges,
    stress::report,
};
use serde_json::json;

use super::{
    Site,
    raw::{Flags, raw_sender, segment, send},
};

/// `TCP_REPAIR_QUEUE` values (`linux/tcp.h`), which the libc crate does not name.
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

fn set_tcp_option(stream: &TcpStream, option: libc::c_int, value: libc::c_int) {
    // SAFETY: `value` is a c_int valid for the call; the kernel reads that many bytes.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("socklen"),
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP option {option}: {}",
        std::io::Error::last_os_error()
    );
}

fn queue_seq(stream: &TcpStream) -> u32 {
    let mut value: u32 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u32>()).expect("socklen");
    // SAFETY: `value` and `len` are valid for writes of the sizes given, for the call only.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    value
}

/// The client's next sequence number to send (the server's `rcv_nxt`, all data being
/// acknowledged) and the next it expects (the server's `snd_nxt`): what a forger has to
/// hit. Read in TCP repair mode (`CAP_NET_ADMIN`), which the socket leaves at once.
fn sequence_numbers(stream: &TcpStream) -> (u32, u32) {
    set_tcp_option(stream, libc::TCP_REPAIR, 1);
    set_tcp_option(stream, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let send_next = queue_seq(stream);
    set_tcp_option(stream, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE);
    let receive_next = queue_seq(stream);
    set_tcp_option(stream, libc::TCP_REPAIR, 0);
    (send_next, receive_next)
}

/// Makes a forged segment's sequence number and flags from the client's next sequence
/// number to send (the server's `rcv_nxt`) and the next it expects.
type Forge = fn(u32, u32) -> (u32, Flags);

/// The client's address and port as the server sees them.
fn local_v4(stream: &TcpStream) -> SocketAddrV4 {
    match stream.local_addr().expect("local address") {
        std::net::SocketAddr::V4(addr) => addr,
        std::net::SocketAddr::V6(_) => unreachable!("an IPv4 client"),
    }
}

#[test]
fn forged_rsts_and_fins_with_wrong_sequence_numbers_never_free_a_slot() {
    const LIMIT: u32 = 2;
    if !require_privileges!() {
        return;
    }
    let site = Site::new(41_720, LIMIT, &[]);
    let server = portgate_tests::common::EchoServer::serve(site.listen());
    let mut clients: Vec<TcpStream> = (0..LIMIT)
        .map(|_| site.connect(Duration::from_secs(5)).expect("a client"))
        .collect();
    assert!(site.settled(u64::from(LIMIT)));
    let before = site.counters().total;
    let to = site.server();
    let full = |what: &str, clients: &mut [TcpStream]| {
        thread::sleep(Duration::from_millis(200));
        let slots = site.gate.slots(site.id).expect("slots");
        assert_eq!(
            (slots.slots, slots.established),
            (u64::from(LIMIT), u64::from(LIMIT)),
            "{what}: the slot is still held"
        );
        assert_eq!(site.sockets_in("established"), LIMIT as usize, "{what}: ss");
        for client in clients {
            echo(client, b"ping")
                .unwrap_or_else(|err| panic!("{what}: the connection works: {err}"));
        }
    };
    let socket = site.outside.run(raw_sender);
    // Out of the window by half the sequence space; in the window but not at `rcv_nxt`
    // (a RST there draws a challenge ACK, a FIN waits in the out-of-order queue).
    let forgeries: [(&str, Forge); 4] = [
        ("an out-of-window RST", |next, _| {
            (next.wrapping_add(1 << 31), Flags::Rst)
        }),
        ("an in-window RST not at rcv_nxt", |next, _| {
            (next.wrapping_add(1), Flags::Rst)
        }),
        ("an out-of-window FIN", |next, ack| {
            (next.wrapping_add(1 << 31), Flags::FinAck(ack))
        }),
        ("an in-window FIN past rcv_nxt", |next, ack| {
            (next.wrapping_add(10_000), Flags::FinAck(ack))
        }),
    ];
    let mut forged = 0_u64;
    for (what, forge) in forgeries {
        for client in &clients {
            let (next, ack) = sequence_numbers(client);
            let (seq, flags) = forge(next, ack);
            let packet = segment(local_v4(client), to, seq, flags);
            for _ in 0..3 {
                assert!(send(&socket, &packet, to), "{what}: sent");
                forged += 1;
            }
        }
        full(what, &mut clients);
    }
    assert!(
        site.connect(REFUSED_WITHIN).is_err(),
        "the port is still full: no connection beyond the limit"
    );
    let counted = super::delta(&site.counters().total, &before);
    assert_eq!(counted.accepted, 0, "{counted:?}");
    assert_eq!(counted.dropped_for(reason::NOT_ALLOWED), 0, "{counted:?}");

    // The RST a real peer would send (at `rcv_nxt`) does close the connection: its slot,
    // exactly one, comes back, and a new connection takes it.
    let reset = clients.pop().expect("a client");
    let (next, _) = sequence_numbers(&reset);
    assert!(send(
        &socket,
        &segment(local_v4(&reset), to, next, Flags::Rst),
        to
    ));
    assert!(
        site.settled(u64::from(LIMIT) - 1),
        "{:?}",
        site.gate.slots(site.id)
    );
    let refilled = site
        .connect(Duration::from_secs(5))
        .expect("the freed slot");
    assert!(site.settled(u64::from(LIMIT)));
    drop((reset, refilled, clients, server));
    report(
        "floods",
        &format!(
            "{forged} forged RSTs and FINs from the clients' own address and port at the \
             established connections of a port limited to {LIMIT} and full: out of the window, \
             and in it but not at rcv_nxt"
        ),
        "no slot freed (kernel count and ss), every connection kept working, no connection \
         beyond the limit admitted; a RST at rcv_nxt freed exactly one slot",
        &json!({ "forged_segments": forged, "limit": LIMIT }),
    );
}

/// Accepts one connection within 5 s.
fn accept(listener: &std::net::TcpListener) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("read timeout");
                return stream;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection to accept");
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Reads until end of file (the peer's FIN), at most 2 s.
fn read_to_end_of_file(stream: &mut TcpStream) {
    let mut buffer = [0_u8; 64];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) => panic!("reading to the peer's FIN: {err}"),
        }
    }
}

#[test]
fn a_half_closed_connection_keeps_its_slot_until_both_sides_have_closed() {
    const LIMIT: u32 = 2;
    if !require_privileges!() {
        return;
    }
    let site = Site::new(41_730, LIMIT, &[]);
    let listener = site.listen();
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let mut client_a = site.connect(Duration::from_secs(5)).expect("client a");
    let mut server_a = accept(&listener);
    let mut client_b = site.connect(Duration::from_secs(5)).expect("client b");
    let mut server_b = accept(&listener);
    assert!(site.settled(2));
    let still_full = |what: &str| {
        thread::sleep(Duration::from_millis(200));
        let slots = site.gate.slots(site.id).expect("slots");
        assert_eq!((slots.slots, slots.established), (2, 2), "{what}");
        assert!(
            site.connect(REFUSED_WITHIN).is_err(),
            "{what}: no connection beyond the limit"
        );
    };

    // The client closes its side: the server is in CLOSE-WAIT and still sends.
    client_a.shutdown(Shutdown::Write).expect("half-close");
    read_to_end_of_file(&mut server_a);
    still_full("the client half-closed");
    assert_eq!(site.sockets_in("close-wait"), 1, "the server's side waits");
    server_a
        .write_all(b"late")
        .expect("the server still writes");
    let mut late = [0_u8; 4];
    client_a
        .read_exact(&mut late)
        .expect("the client still reads");
    assert_eq!(&late, b"late");
    // The server closes too: the slot comes back, and a new connection takes it.
    drop(server_a);
    assert!(
        eventually(Duration::from_secs(5), || site
            .gate
            .slots(site.id)
            .expect("slots")
            .established
            == 1),
        "both sides closed: {:?}",
        site.gate.slots(site.id)
    );
    drop(client_a);
    let client_c = site.connect(Duration::from_secs(5)).expect("client c");
    let server_c = accept(&listener);

    // The server closes its side first: it waits in FIN-WAIT-2, the client still sends.
    server_b.shutdown(Shutdown::Write).expect("half-close");
    read_to_end_of_file(&mut client_b);
    still_full("the server half-closed");
    assert_eq!(site.sockets_in("fin-wait-2"), 1, "the server's side waits");
    client_b
        .write_all(b"late")
        .expect("the client still writes");
    server_b
        .read_exact(&mut late)
        .expect("the server still reads");
    // The client closes too: the server's side goes to TIME-WAIT, and the slot comes back.
    drop(client_b);
    assert!(
        site.settled(1),
        "both sides closed: {:?}",
        site.gate.slots(site.id)
    );
    drop((server_b, client_c, server_c));
    assert!(site.settled(0), "{:?}", site.gate.slots(site.id));
    report(
        "floods",
        &format!(
            "half-closed connections at a full port limited to {LIMIT}: the client's side shut \
             down first, then the server's"
        ),
        "each kept its slot (no connection beyond the limit admitted) and carried data the \
         other way until both sides had closed; then exactly its slot came back",
        &json!({ "limit": LIMIT }),
    );
}
