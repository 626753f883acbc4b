//! The accept loop of the API socket and of the metrics address, and the deadlines of a
//! connection's reads and writes (the limits are in [`super::connections`]).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{Router, body::Body, extract::ConnectInfo, http::Request};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
    task::JoinSet,
    time::{Instant, Sleep},
};

use super::connections::{
    ACCEPT_BACKOFF, ApiConnections, BODY_TIMEOUT, Cut, HEADER_TIMEOUT, Holder, MAX_HEAD_BYTES,
    REFUSAL_LINGER, Slot, WRITE_TIMEOUT,
};
use crate::{api::ErrorBody, daemon::auth::Peer};

/// Serves `router` on the API socket until `shutdown`, then waits for the open requests.
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    router: Router,
    connections: Arc<ApiConnections>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = &listener;
    let accept = move || async move {
        let (stream, _) = listener.accept().await?;
        let peer = Peer::of(&stream);
        Ok((stream, peer, Holder::of(&peer)))
    };
    serve(accept, router, connections, shutdown).await
}

/// Serves `router` on the metrics address until `shutdown` (no credentials: every client
/// is nobody, within [`Limits::metrics`](super::connections::Limits::metrics)).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    router: Router,
    connections: Arc<ApiConnections>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = &listener;
    let accept = move || async move {
        let (stream, _) = listener.accept().await?;
        Ok((stream, Peer::nobody(), Holder::Metrics))
    };
    serve(accept, router, connections, shutdown).await
}

/// The accept loop: takes a connection when its holder has room (else answers 503 and
/// closes it), serves each on a task of its own, and at `shutdown` lets the open ones
/// finish their requests.
async fn serve<S, F>(
    mut accept: impl FnMut() -> F,
    router: Router,
    connections: Arc<ApiConnections>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = io::Result<(S, Peer, Holder)>>,
{
    let mut open = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        // Finished connections' tasks, so that the set holds only open ones.
        while open.try_join_next().is_some() {}
        let (stream, peer, holder) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("accepting an API connection: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match connections.take(holder) {
            Ok(slot) => {
                let connection = Connection {
                    peer,
                    slot,
                    router: router.clone(),
                    connections: Arc::clone(&connections),
                };
                open.spawn(connection.serve(stream, shutdown.clone()));
            }
            Err(cut) => {
                log::debug!("refused an API connection of {peer:?}: {}", cut.name());
                connections.count(cut);
                // Answered once its request is read (an HTTP client takes no answer before
                // it has asked); when too many refusals are under way, closed at once.
                if let Ok(turn) = Arc::clone(&connections.refusing).try_acquire_owned() {
                    tokio::spawn(refuse(stream, cut, turn));
                }
            }
        }
    }
    while open.join_next().await.is_some() {}
    Ok(())
}

/// Answers a connection over a limit `503 too_many_connections` once its request head has
/// arrived (within [`REFUSAL_LINGER`]), and closes it.
async fn refuse<S>(stream: S, cut: Cut, _turn: tokio::sync::OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |_: Request<Incoming>| async move {
        Ok::<_, std::convert::Infallible>(refusal(cut))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_LINGER)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _served = tokio::time::timeout(REFUSAL_LINGER * 2, connection).await;
}

/// The answer to a connection over a limit.
fn refusal(cut: Cut) -> axum::response::Response {
    let message = match cut {
        Cut::UserLimit => "this user has as many connections open to the daemon as one user may (or all users together their share): close some, or wait for them to end".to_owned(),
        _ => "the daemon has as many connections open as it takes: try again shortly".to_owned(),
    };
    let body = ErrorBody::bad_request("too_many_connections", message);
    axum::response::IntoResponse::into_response((
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::CONNECTION, "close")],
        axum::Json(body),
    ))
}

/// One connection taken: its peer and place.
struct Connection {
    peer: Peer,
    slot: Slot,
    router: Router,
    connections: Arc<ApiConnections>,
}

impl Connection {
    /// Serves the connection's requests until it closes, a deadline cuts it, or shutdown
    /// (the request being answered is finished first).
    async fn serve<S>(self, stream: S, mut shutdown: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            peer,
            slot,
            router,
            connections,
        } = self;
        let io = TokioIo::new(WriteDeadline {
            io: stream,
            stalled: None,
            connections: Arc::clone(&connections),
        });
        let body_connections = Arc::clone(&connections);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(|body| {
                Body::new(BodyDeadline {
                    body,
                    deadline: Instant::now() + BODY_TIMEOUT,
                    timer: None,
                    connections: Arc::clone(&body_connections),
                })
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move {
                // The router is always ready (its error type is `Infallible`).
                std::future::poll_fn(|cx| {
                    <Router as tower_service::Service<Request<Body>>>::poll_ready(&mut router, cx)
                })
                .await?;
                <Router as tower_service::Service<Request<Body>>>::call(&mut router, request).await
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = shutdown.wait_for(|stop| *stop), if !stopping => {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(err) = result {
            if err.is_timeout() {
                connections.count(Cut::HeaderTimeout);
            }
            log::debug!("API connection of {peer:?} closed: {err}");
        }
        drop(slot);
    }
}

/// A connection's stream whose writes may wait at most [`WRITE_TIMEOUT`] for the client to
/// read: past that the write fails and the connection closes.
struct WriteDeadline<S> {
    io: S,
    /// Since when a write has waited, as the sleep until it times out.
    stalled: Option<Pin<Box<Sleep>>>,
    connections: Arc<ApiConnections>,
}

impl<S> WriteDeadline<S> {
    /// `poll` as it is when it is ready (the client read: no deadline), else pending until
    /// the write has waited [`WRITE_TIMEOUT`].
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        self.connections.count(Cut::WriteTimeout);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing of its answer for {WRITE_TIMEOUT:?}"),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that must have arrived by its deadline ([`BODY_TIMEOUT`] after its
/// head): past it, reading it fails (the handler answers 4xx) and the connection closes.
struct BodyDeadline {
    body: Incoming,
    deadline: Instant,
    /// Set at the first wait for the body.
    timer: Option<Pin<Box<Sleep>>>,
    connections: Arc<ApiConnections>,
}

/// A body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {BODY_TIMEOUT:?} of its head")]
struct BodyTimedOut;

impl hyper::body::Body for BodyDeadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.connections.count(Cut::BodyTimeout);
        Poll::Ready(Some(Err(BodyTimedOut.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
