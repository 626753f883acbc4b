//! A loopback TCP bridge to a daemon's Unix socket, for HTTP clients that speak only TCP
//! (schemathesis): each connection accepted on `127.0.0.1:PORT` is joined to a new
//! connection on the socket, and bytes are copied both ways until either side closes.
//!
//! The bridge's thread can drop to another user before it connects anything: the daemon
//! reads the peer credentials of each socket connection (`SO_PEERCRED`, taken from the
//! thread that calls `connect`), so every request through the bridge is that user's, with
//! that user's rights only. It drops them with the raw `setres[ug]id` system calls, which
//! change the calling thread's credentials only (glibc's wrappers would change every
//! thread of the test process); the threads it starts inherit them.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// How long one side of a bridged connection may stay silent before the bridge closes it:
/// bounds every copying thread.
const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// The most bridged connections the bridge makes over its life (a bound, far above what a
/// test's client opens).
const MAX_CONNECTIONS: usize = 100_000;
/// How often the accepting thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(20);

/// A running bridge; dropping it stops accepting, closes the open connections and joins
/// every thread.
pub struct UnixBridge {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UnixBridge {
    /// A bridge from a free loopback port to `socket`, whose connections are made as
    /// (uid, gid) `user` when given (else as the test process's own user).
    pub fn start(socket: &Path, user: Option<(u32, u32)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the bridge");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("the bridge's address");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            let socket = socket.to_owned();
            thread::spawn(move || {
                if let Some((uid, gid)) = user
                    && let Err(err) = become_user(uid, gid)
                {
                    let _ignored = ready.send(Err(err));
                    return;
                }
                let _ignored = ready.send(Ok(()));
                accept_loop(&listener, &socket, &stop);
            })
        };
        is_ready
            .recv()
            .expect("the bridge's thread started")
            .expect("the bridge's thread took the user's credentials");
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Where clients connect: `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ignored = thread.join();
        }
    }
}

/// Takes the credentials of (uid, gid) for this thread only: no supplementary groups.
fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let none: [libc::gid_t; 0] = [];
    // SAFETY: raw system calls with valid arguments (an empty group list, plain ids); they
    // change only the calling thread's credentials, which is the point.
    let results = unsafe {
        [
            libc::syscall(libc::SYS_setgroups, 0, none.as_ptr()),
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        ]
    };
    if results.iter().any(|result| *result != 0) {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts until `stop`, then closes every open connection and joins its threads.
fn accept_loop(listener: &TcpListener, socket: &Path, stop: &AtomicBool) {
    let mut open: Vec<(TcpStream, UnixStream, [JoinHandle<()>; 2])> = Vec::new();
    let mut made = 0;
    while !stop.load(Ordering::Relaxed) && made < MAX_CONNECTIONS {
        match listener.accept() {
            Ok((client, _)) => {
                made += 1;
                if let Some(joined) = join(client, socket) {
                    open.push(joined);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(err) => {
                eprintln!("bridge: accept: {err}");
                thread::sleep(POLL);
            }
        }
        // Forget the connections both of whose threads are done.
        open.retain(|(_, _, threads)| !threads.iter().all(JoinHandle::is_finished));
    }
    for (client, daemon, threads) in open {
        let _ignored = client.shutdown(Shutdown::Both);
        let _ignored = daemon.shutdown(Shutdown::Both);
        for thread in threads {
            let _ignored = thread.join();
        }
    }
}

/// Joins `client` to a new connection on `socket`: two copying threads, and the two
/// streams (to close them when the bridge stops). `None` when the socket refused.
fn join(client: TcpStream, socket: &Path) -> Option<(TcpStream, UnixStream, [JoinHandle<()>; 2])> {
    let daemon = match UnixStream::connect(socket) {
        Ok(daemon) => daemon,
        Err(err) => {
            eprintln!("bridge: connecting to {}: {err}", socket.display());
            return None;
        }
    };
    let streams = (|| {
        client.set_nonblocking(false)?;
        client.set_read_timeout(Some(IDLE_TIMEOUT))?;
        daemon.set_read_timeout(Some(IDLE_TIMEOUT))?;
        Ok::<_, io::Error>((
            client.try_clone()?,
            client.try_clone()?,
            daemon.try_clone()?,
            daemon.try_clone()?,
        ))
    })();
    let (client_in, client_out, daemon_in, daemon_out) = match streams {
        Ok(streams) => streams,
        Err(err) => {
            eprintln!("bridge: setting up a connection: {err}");
            return None;
        }
    };
    let up = thread::spawn(move || copy(client_in, daemon_out));
    let down = thread::spawn(move || copy(daemon_in, client_out));
    Some((client, daemon, [up, down]))
}

/// Copies `from` into `to` until `from` ends, fails or stays silent too long, then ends
/// `to`'s writing side so that the other end sees the close.
fn copy<R, W>(mut from: R, mut to: W)
where
    R: io::Read,
    W: io::Write + ShutdownWrite,
{
    let _ignored = io::copy(&mut from, &mut to);
    to.shutdown_write();
}

/// Ends the writing side of a stream.
trait ShutdownWrite {
    fn shutdown_write(&self);
}

impl ShutdownWrite for TcpStream {
    fn shutdown_write(&self) {
        let _ignored = self.shutdown(Shutdown::Write);
    }
}

impl ShutdownWrite for UnixStream {
    fn shutdown_write(&self) {
        let _ignored = self.shutdown(Shutdown::Write);
    }
}
