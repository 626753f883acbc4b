//! A TCP server that records what it accepts: each connection's peer, and how many bytes
//! it has read from it. What a client sees can be a timeout for several reasons; what the
//! server accepted and read is what the gate let through.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// What the server does with a connection once it has recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// Echoes what it reads (on a thread of its own), counting the bytes, until the peer
    /// closes or a minute passes idle.
    Echo,
    /// Closes it at once: many short connections, one thread.
    Close,
}

/// One accepted connection.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The client's address and port, as `accept` returned them.
    pub peer: SocketAddr,
    received: Arc<AtomicU64>,
}

impl Accepted {
    /// Bytes read from the connection so far ([`Serve::Echo`] only).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// The server. It stops accepting on drop (or after [`RecordingServer::LIFETIME`]).
pub struct RecordingServer {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RecordingServer {
    /// The longest it serves: a bound on its thread, not a test's expected duration.
    pub const LIFETIME: Duration = Duration::from_mins(10);

    /// Serves on `listener` (made by the caller, in the namespace and cgroup it wants).
    pub fn serve(listener: TcpListener, serve: Serve) -> Self {
        let addr = listener.local_addr().expect("listener address");
        // `accept` waits at most this long, so that the loop sees `stop`.
        socket2::SockRef::from(&listener)
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("accept timeout");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || accept_loop(&listener, serve, &accepted, &stop))
        };
        Self {
            addr,
            accepted,
            stop,
            handle: Some(handle),
        }
    }

    /// Every connection accepted so far, in order.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many connections it has accepted.
    pub fn count(&self) -> usize {
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The connection accepted from `peer` (the client's local address), if any.
    pub fn from_peer(&self, peer: SocketAddr) -> Option<Accepted> {
        self.accepted()
            .into_iter()
            .find(|accepted| accepted.peer == peer)
    }
}

fn accept_loop(
    listener: &TcpListener,
    serve: Serve,
    accepted: &Mutex<Vec<Accepted>>,
    stop: &AtomicBool,
) {
    let deadline = Instant::now() + RecordingServer::LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (stream, peer) = match listener.accept() {
            Ok(connection) => connection,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // A connection reset before it was accepted, or out of descriptors for a
            // moment: try again, without spinning.
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let received = Arc::new(AtomicU64::new(0));
        accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Accepted {
                peer,
                received: received.clone(),
            });
        match serve {
            Serve::Echo => {
                thread::spawn(move || echo_counting(stream, &received));
            }
            Serve::Close => drop(stream),
        }
    }
}

fn echo_counting(mut stream: TcpStream, received: &AtomicU64) {
    if stream
        .set_read_timeout(Some(Duration::from_mins(1)))
        .is_err()
    {
        return;
    }
    let mut buffer = [0u8; 1024];
    for _ in 0..10_000 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::SeqCst);
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ignored = handle.join();
        }
    }
}

/// Sets `TCP_USER_TIMEOUT` on a client: once data it sent has gone unacknowledged this
/// long, the kernel aborts the connection and its next call fails with `ETIMEDOUT`.
pub fn give_up_unacknowledged_after(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_user_timeout(Some(timeout))
}
