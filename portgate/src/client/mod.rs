//! The CLI's side of the local API ([`crate::api`]): HTTP/1.1 + JSON over the daemon's Unix
//! socket, one connection per call.
//!
//! Errors stay typed ([`ClientError`]); each one's message is a single line saying what was
//! wrong and what to do, ready for the CLI to print as it is.

use std::{
    fmt, io,
    net::IpAddr,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, ErrorBody, EventView, GrantInfoView,
        GrantRequest, KeyCreated, KeyRequestBody, KeyView, NetnsView, OwnerSpec, RenewRequest,
        StatusView,
    },
    model::{AccessChange, PortId, PortReport},
};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (it is missing, or no daemon listens on it).
    #[error(
        "cannot connect to the daemon at {}: {reason}: is the daemon running? start it with `portgate daemon` or set --socket / PORTGATE_SOCKET",
        socket.display()
    )]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// Why the connection failed.
        reason: io::Error,
    },
    /// The socket's permissions keep this user out.
    #[error(
        "permission denied on the daemon's socket {}: run portgate as root or as a member of the daemon's admin group ([daemon] admin_group, `portgate` by default)",
        socket.display()
    )]
    PermissionDenied {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The connection broke during the exchange.
    #[error(
        "the connection to the daemon at {} failed during {request}: {reason}: check that the daemon is still running and read its log",
        socket.display()
    )]
    Exchange {
        /// The socket used.
        socket: PathBuf,
        /// The request, as `METHOD /path`.
        request: String,
        /// What hyper reported.
        reason: hyper::Error,
    },
    /// The daemon did not answer in time.
    #[error(
        "the daemon at {} did not answer {request} within {}s: check that it is not stuck (its log, `systemctl status portgate`)",
        socket.display(),
        after.as_secs()
    )]
    TimedOut {
        /// The socket used.
        socket: PathBuf,
        /// The request, as `METHOD /path`.
        request: String,
        /// How long the client waited.
        after: std::time::Duration,
    },
    /// The daemon refused the request; its message says why and what to do.
    #[error("{message}")]
    Daemon {
        /// The HTTP status.
        status: u16,
        /// The daemon's stable error code (`not_allocated`, `range_exhausted`, ...).
        code: String,
        /// The daemon's one-line message.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error(
        "the daemon's answer to {request} (HTTP {status}) could not be read: {why}: check that the daemon and this CLI are the same version (`portgate status`, `portgate --version`)"
    )]
    BadAnswer {
        /// The request, as `METHOD /path`.
        request: String,
        /// The HTTP status of the answer.
        status: u16,
        /// What was wrong with it.
        why: String,
    },
    /// The request could not be put together (a bug: every request is built from typed values).
    #[error(
        "could not build the request {request}: {why}: this is a bug in portgate, please report it"
    )]
    Request {
        /// The request, as `METHOD /path`.
        request: String,
        /// What was wrong.
        why: String,
    },
}

/// What a call of the daemon's API gives: its answer, or why there is none.
pub type Reply<T> = Result<T, ClientError>;

/// A client of the daemon's local API.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The daemon's socket.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/ports`: allocates a port.
    pub async fn alloc(&self, request: &AllocRequest) -> Result<AllocationView, ClientError> {
        self.call(Method::POST, "/v1/ports".to_owned(), Some(request))
            .await
    }

    /// `GET /v1/ports`: every allocation.
    pub async fn list(&self) -> Result<Vec<AllocationView>, ClientError> {
        self.call(Method::GET, "/v1/ports".to_owned(), NO_BODY)
            .await
    }

    /// `GET /v1/ports/{port}`: one allocation.
    pub async fn show(&self, id: PortId) -> Result<AllocationView, ClientError> {
        self.call(Method::GET, port_path(id, ""), NO_BODY).await
    }

    /// `DELETE /v1/ports/{port}`: releases a port (it goes Draining).
    pub async fn release(&self, id: PortId) -> Result<AllocationView, ClientError> {
        self.call(Method::DELETE, port_path(id, ""), NO_BODY).await
    }

    /// `POST /v1/ports/{port}/drain`: no new connections; established ones continue.
    pub async fn drain(&self, id: PortId) -> Result<AllocationView, ClientError> {
        self.call(Method::POST, port_path(id, "/drain"), NO_BODY)
            .await
    }

    /// `POST /v1/ports/{port}/renew`: renews a port's lease.
    pub async fn renew(&self, id: PortId, request: &RenewRequest) -> Reply<AllocationView> {
        let path = port_path(id, "/renew");
        self.call(Method::POST, path, Some(request)).await
    }

    /// `PATCH /v1/ports/{port}/access`: changes a port's access control.
    pub async fn access(&self, id: PortId, change: &AccessChange) -> Reply<AllocationView> {
        let path = port_path(id, "/access");
        self.call(Method::PATCH, path, Some(change)).await
    }

    /// `PATCH /v1/ports/{port}/owner`: hands a port to the owner cgroup `owner` names (a
    /// cgroup, a process or a container, not a namespace: the port keeps its own).
    pub async fn set_owner(&self, id: PortId, owner: &OwnerSpec) -> Reply<AllocationView> {
        let path = port_path(id, "/owner");
        self.call(Method::PATCH, path, Some(owner)).await
    }

    /// `POST /v1/ports/{port}/grants`: lets an authenticated source connect for a while.
    pub async fn grant(&self, id: PortId, request: &GrantRequest) -> Result<(), ClientError> {
        let path = port_path(id, "/grants");
        self.exchange(Method::POST, path, Some(request))
            .await?
            .success()
            .map(drop)
    }

    /// `GET /v1/ports/{port}/grants`: the port's grants, with who issued each.
    pub async fn grants(&self, id: PortId) -> Result<Vec<GrantInfoView>, ClientError> {
        self.call(Method::GET, port_path(id, "/grants"), NO_BODY)
            .await
    }

    /// `DELETE /v1/ports/{port}/grants?ip=`: withdraws a grant at once.
    pub async fn revoke_grant(&self, id: PortId, ip: IpAddr) -> Result<(), ClientError> {
        let path = format!("{}&ip={ip}", port_path(id, "/grants"));
        self.exchange(Method::DELETE, path, NO_BODY)
            .await?
            .success()
            .map(drop)
    }

    /// `POST /v1/keys`: a new client key (administrators only); the answer holds its key
    /// file, shown this once.
    pub async fn add_key(&self, request: &KeyRequestBody) -> Result<KeyCreated, ClientError> {
        self.call(Method::POST, "/v1/keys".to_owned(), Some(request))
            .await
    }

    /// `GET /v1/fleet/nodes`: the fleet's live nodes (fleet mode).
    pub async fn fleet_nodes(&self) -> Result<Vec<crate::api::NodeView>, ClientError> {
        self.call(Method::GET, "/v1/fleet/nodes".to_owned(), NO_BODY)
            .await
    }

    /// `POST /v1/fleet/repair`: takes over a dead node's ports and releases them
    /// (administrators only; answers once the node was seen gone twice, a lease apart).
    pub async fn fleet_repair(
        &self,
        request: &crate::api::RepairRequest,
    ) -> Result<crate::api::RepairView, ClientError> {
        self.call(Method::POST, "/v1/fleet/repair".to_owned(), Some(request))
            .await
    }

    /// `GET /v1/keys`: every client key, without its secret (administrators only).
    pub async fn keys(&self) -> Result<Vec<KeyView>, ClientError> {
        self.call(Method::GET, "/v1/keys".to_owned(), NO_BODY).await
    }

    /// `DELETE /v1/keys/{name}`: revokes a key and withdraws the grants it issued.
    pub async fn revoke_key(&self, name: &str) -> Result<(), ClientError> {
        let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        self.exchange(Method::DELETE, format!("/v1/keys/{name}"), NO_BODY)
            .await?
            .success()
            .map(drop)
    }

    /// `GET /v1/ports/{port}/check`: would a new connection from `ip` get in? A refusal is
    /// an answer (`allowed: false`), not an error.
    pub async fn check(&self, id: PortId, ip: IpAddr) -> Result<CheckResponse, ClientError> {
        let path = format!("{}&ip={ip}", port_path(id, "/check"));
        self.call(Method::GET, path, NO_BODY).await
    }

    /// `GET /v1/netns?name=`: the namespace `name` means: an allocation's label (as the
    /// NETNS column shows it), a cookie, `host`, or a path (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`) the daemon opens.
    pub async fn netns(&self, name: &str) -> Result<NetnsView, ClientError> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("name", name)
            .finish();
        self.call(Method::GET, format!("/v1/netns?{query}"), NO_BODY)
            .await
    }

    /// `GET /v1/stats`: counters and policy of every port, or of one.
    pub async fn stats(&self, port: Option<PortId>) -> Result<Vec<PortReport>, ClientError> {
        let path = match port {
            Some(id) => format!("/v1/stats?port={}&{}", id.port, port_query(id)),
            None => "/v1/stats".to_owned(),
        };
        self.call(Method::GET, path, NO_BODY).await
    }

    /// `GET /v1/events`: deny events, each handed to `on_event` as its line arrives. Without
    /// `follow` it ends with the events the daemon holds; with it, it waits for new ones
    /// until the daemon closes the stream or `on_event` breaks.
    pub async fn events(
        &self,
        follow: bool,
        mut on_event: impl FnMut(EventView) -> ControlFlow<()>,
    ) -> Result<(), ClientError> {
        let path = if follow {
            "/v1/events?follow=true"
        } else {
            "/v1/events"
        };
        let (request, response) = self.send(Method::GET, path.to_owned(), NO_BODY).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let body = self.collect(body, &request).await?;
            return Err(error_answer(&request, status, &body));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|reason| self.exchange_error(&request, reason))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Some(event) = event_line(&request, status, &line)?
                    && on_event(event).is_break()
                {
                    return Ok(());
                }
            }
        }
        if let Some(event) = event_line(&request, status, &pending)? {
            let _flow = on_event(event);
        }
        Ok(())
    }

    /// `GET /v1/status`: the daemon, its range and the kernel gate.
    pub async fn status(&self) -> Result<StatusView, ClientError> {
        self.call(Method::GET, "/v1/status".to_owned(), NO_BODY)
            .await
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let answer = self
            .exchange(Method::GET, "/metrics".to_owned(), NO_BODY)
            .await?
            .success()?;
        String::from_utf8(answer.body.to_vec())
            .map_err(|err| answer.bad(format!("not UTF-8 text ({err})")))
    }

    /// Sends a request and decodes a successful answer's JSON.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let answer = self.exchange(method, path, body).await?.success()?;
        serde_json::from_slice(&answer.body).map_err(|err| answer.bad(err.to_string()))
    }

    /// Sends a request and reads the whole answer.
    async fn exchange(
        &self,
        method: Method,
        path: String,
        body: Option<&impl Serialize>,
    ) -> Result<Answer, ClientError> {
        let name = format!("{method} {path}");
        let whole = async {
            let (request, response) = self.send(method, path, body).await?;
            let status = response.status();
            let body = self.collect(response.into_body(), &request).await?;
            Ok(Answer {
                request,
                status,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, whole)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::TimedOut {
                    socket: self.socket.clone(),
                    request: name,
                    after: REQUEST_TIMEOUT,
                })
            })
    }

    /// Connects and sends one request; returns its name for messages (`METHOD /path`) and
    /// the answer with its body still to read.
    async fn send(
        &self,
        method: Method,
        path: String,
        body: Option<&impl Serialize>,
    ) -> Result<(String, Response<Incoming>), ClientError> {
        let name = format!("{method} {path}");
        let unbuildable = |why: String| ClientError::Request {
            request: name.clone(),
            why,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        let bytes = match body {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(body).map_err(|err| unbuildable(err.to_string()))?
            }
            None => Vec::new(),
        };
        let request = builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|err| unbuildable(err.to_string()))?;

        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|reason| self.connect_error(reason))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|reason| self.exchange_error(&name, reason))?;
        // hyper's connection object does the I/O; it ends when the answer has been read.
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                log::debug!("connection to the daemon ended: {err}");
            }
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|reason| self.exchange_error(&name, reason))?;
        Ok((name, response))
    }

    /// Reads a whole body.
    async fn collect(&self, body: Incoming, request: &str) -> Result<Bytes, ClientError> {
        body.collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .map_err(|reason| self.exchange_error(request, reason))
    }

    fn connect_error(&self, reason: io::Error) -> ClientError {
        let socket = self.socket.clone();
        if reason.kind() == io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied { socket }
        } else {
            ClientError::Connect { socket, reason }
        }
    }

    fn exchange_error(&self, request: &str, reason: hyper::Error) -> ClientError {
        ClientError::Exchange {
            socket: self.socket.clone(),
            request: request.to_owned(),
            reason,
        }
    }
}

/// How long one request (not an `events -f` stream) may take: the daemon answers in
/// milliseconds, so this only ends the wait on a daemon that is stuck.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(1);

/// For requests without a body.
const NO_BODY: Option<&()> = None;

/// A whole answer.
struct Answer {
    /// The request, as `METHOD /path`.
    request: String,
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    /// The answer if it is a success, otherwise the daemon's error.
    fn success(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(error_answer(&self.request, self.status, &self.body))
        }
    }

    /// The error for an answer that is not what the API promises.
    fn bad(&self, why: String) -> ClientError {
        ClientError::BadAnswer {
            request: self.request.clone(),
            status: self.status.as_u16(),
            why,
        }
    }
}

/// `/v1/ports/{port}{tail}?proto={proto}[&netns={cookie}]`.
fn port_path(id: PortId, tail: &str) -> String {
    format!("/v1/ports/{}{tail}?{}", id.port, port_query(id))
}

/// The query naming a port's protocol, and its namespace unless it is the host's.
fn port_query(id: PortId) -> String {
    if id.netns.is_host() {
        format!("proto={}", id.protocol)
    } else {
        format!("proto={}&netns={}", id.protocol, id.netns.0)
    }
}

/// The error of a 4xx/5xx answer: the daemon's [`ErrorBody`], or what came instead.
fn error_answer(request: &str, status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(answer) => ClientError::Daemon {
            status: status.as_u16(),
            code: answer.error.code,
            message: answer.error.message,
        },
        Err(_) => ClientError::BadAnswer {
            request: request.to_owned(),
            status: status.as_u16(),
            why: format!("an error without an error body: {}", Snippet(body)),
        },
    }
}

/// One line of the event stream; `None` for a blank line.
fn event_line(
    request: &str,
    status: StatusCode,
    line: &[u8],
) -> Result<Option<EventView>, ClientError> {
    if line.trim_ascii().is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|err| ClientError::BadAnswer {
            request: request.to_owned(),
            status: status.as_u16(),
            why: format!("event line {}: {err}", Snippet(line)),
        })
}

/// The start of a body, on one line, for messages.
struct Snippet<'a>(&'a [u8]);

impl fmt::Display for Snippet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 120;
        let text = String::from_utf8_lossy(self.0);
        let text = text.trim();
        if text.is_empty() {
            return f.write_str("(empty)");
        }
        let mut shown: String = text
            .chars()
            .take(MAX_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.chars().count() > MAX_CHARS {
            shown.push_str("...");
        }
        write!(f, "{shown:?}")
    }
}

/// A stand-in daemon for tests: canned answers from an axum router on a Unix socket.
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
