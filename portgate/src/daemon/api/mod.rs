//! The local API's handlers: HTTP + JSON over the Unix socket (routes in [`crate::api`]).
//!
//! Every request is authorized from the socket's peer credentials, timed into the latency
//! histogram, and written to the audit log with its outcome: handlers answer through
//! `Caller::answer`, which does all three. Bad input (JSON, ports, addresses, durations)
//! is refused with a 4xx and an [`ErrorBody`] before the manager is asked, so it changes
//! nothing. `ports` holds the calls on ports, `reads` the views of the whole daemon,
//! `namespace` what a namespace's name means.

pub mod connections;
mod fleet;
mod keys;
mod namespace;
pub mod openapi;
mod placement;
mod ports;
mod reads;
mod serve;

use std::{collections::HashMap, convert::Infallible, net::IpAddr, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        ConnectInfo, DefaultBodyLimit, FromRequestParts, Path as UrlPath, Query, Request,
        rejection::BytesRejection,
    },
    http::{StatusCode, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{delete, get, patch, post},
};
use serde::{Serialize, de::DeserializeOwned};

pub use self::reads::{metrics_response, metrics_router};
use super::{
    App,
    audit::{AuditParams, AuditRecord, now_rfc3339},
    auth::Peer,
};
use crate::{
    api::{ErrorBody, MAX_BODY_BYTES, decode_body},
    manager::{Actor, ErrorSource, PortError},
    model::{NetnsId, PortId, Protocol, UnknownProtocol},
};

/// The API router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/ports", post(ports::alloc).get(ports::list))
        .route("/v1/ports/{port}", get(ports::show).delete(ports::release))
        .route("/v1/ports/{port}/drain", post(ports::drain))
        .route("/v1/ports/{port}/renew", post(ports::renew))
        .route("/v1/ports/{port}/access", patch(ports::access))
        .route("/v1/ports/{port}/owner", patch(ports::owner))
        .route(
            "/v1/ports/{port}/grants",
            post(ports::grant)
                .get(ports::grants)
                .delete(ports::revoke_grant),
        )
        .route("/v1/ports/{port}/check", get(ports::check))
        .route("/v1/netns", get(namespace::find))
        .route("/v1/keys", post(keys::add).get(keys::list))
        .route("/v1/keys/{name}", delete(keys::revoke))
        .route("/v1/fleet/nodes", get(fleet::nodes))
        .route("/v1/fleet/repair", post(fleet::repair))
        .route("/v1/stats", get(reads::stats))
        .route("/v1/events", get(reads::events))
        .route("/v1/status", get(reads::status))
        .route("/metrics", get(reads::metrics))
        .route("/v1/openapi.json", get(openapi::openapi_json))
        .fallback(async |caller| refuse(caller, &UNKNOWN_ROUTE).await)
        .method_not_allowed_fallback(async |caller| refuse(caller, &WRONG_METHOD).await)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(run_to_completion))
        .with_state(app)
}

/// A failed request.
#[derive(Debug)]
pub enum ApiError {
    /// The manager refused it.
    Port(PortError),
    /// The request itself is wrong.
    Bad {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: ErrorBody,
    },
}

impl ApiError {
    fn bad(code: &str, message: impl Into<String>) -> Self {
        Self::Bad {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody::bad_request(code, message),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Port(err) => {
                StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Self::Bad { status, .. } => *status,
        }
    }

    fn code(&self) -> String {
        match self {
            Self::Port(err) => err.code().to_owned(),
            Self::Bad { body, .. } => body.error.code.clone(),
        }
    }

    fn into_response(self) -> Response {
        let status = self.status();
        let body = match self {
            Self::Port(err) => ErrorBody::of(&err),
            Self::Bad { body, .. } => body,
        };
        (status, Json(body)).into_response()
    }
}

impl From<PortError> for ApiError {
    fn from(err: PortError) -> Self {
        Self::Port(err)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What the audit record of a request names.
struct Audit {
    action: &'static str,
    id: Option<PortId>,
    /// The client key named.
    key: Option<String>,
    /// The source address named (a grant's).
    addr: Option<IpAddr>,
    /// What the request asked for.
    params: AuditParams,
    started: Instant,
}

impl Audit {
    /// The record of `action`, begun now.
    fn started(action: &'static str) -> Self {
        Self {
            action,
            id: None,
            key: None,
            addr: None,
            params: AuditParams::default(),
            started: Instant::now(),
        }
    }
}

/// Who is calling: the daemon's state and the peer at the other end of the socket.
struct Caller {
    app: Arc<App>,
    peer: Peer,
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Infallible> {
        // Every connection carries its peer (`into_make_service_with_connect_info`); one
        // without is nobody's, with no rights.
        let peer = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .map_or_else(Peer::nobody, |ConnectInfo(peer)| *peer);
        Ok(Self {
            app: Arc::clone(app),
            peer,
        })
    }
}

impl Caller {
    /// Runs `call` for `action`, then times it, writes its audit record and answers with
    /// `ok` and the value (a 204 has no body), or with the error.
    async fn answer<T: Serialize>(
        &self,
        action: &'static str,
        ok: StatusCode,
        call: impl AsyncFnOnce(&mut Audit) -> ApiResult<T>,
    ) -> Response {
        let mut audit = Audit::started(action);
        let (status, code, response) = match call(&mut audit).await {
            Ok(_) if ok == StatusCode::NO_CONTENT => (ok, "ok".to_owned(), ok.into_response()),
            Ok(value) => (ok, "ok".to_owned(), (ok, Json(value)).into_response()),
            Err(err) => (err.status(), err.code(), err.into_response()),
        };
        self.record(audit, status, &code);
        response
    }

    /// Times an answered request and writes its audit record; a request that failed
    /// with a 5xx is counted as an error of the API.
    fn record(&self, audit: Audit, status: StatusCode, code: &str) {
        let monitor = self.app.manager.monitor();
        monitor.record_api_latency(audit.action, audit.started.elapsed().as_secs_f64());
        if status.is_server_error() {
            monitor.record_error(ErrorSource::Api);
        }
        let proto = audit.id.map(|id| id.protocol.to_string());
        self.app.audit.record(&AuditRecord {
            time: now_rfc3339(),
            uid: self.peer.uid,
            pid: self.peer.pid,
            action: audit.action,
            port: audit.id.map(|id| id.port),
            proto: proto.as_deref(),
            netns: audit
                .id
                .filter(|id| !id.netns.is_host())
                .map(|id| id.netns.0),
            result: code,
            status: status.as_u16(),
            key: audit.key.as_deref(),
            addr: audit.addr,
            grant_for: None,
            count: None,
            params: audit.params,
        });
    }

    /// The caller's rights.
    fn actor(&self) -> ApiResult<Actor> {
        self.app.admin.actor(&self.peer).ok_or_else(|| {
            ApiError::Port(PortError::AccessDenied(
                "the caller's credentials could not be read from the socket".to_owned(),
            ))
        })
    }

    /// The port `raw` names with the query's `proto`, checked against the managed range.
    fn port_id(&self, raw: &str, query: &HashMap<String, String>) -> ApiResult<PortId> {
        let port: u16 = raw.parse().map_err(|_| {
            ApiError::bad(
                "invalid_port",
                format!("{raw:?} is not a port number: give 1-65535"),
            )
        })?;
        let netns = netns(query)?;
        let config = self.app.manager.config();
        if netns.is_host() && !(config.min_port..=config.max_port).contains(&port) {
            return Err(ApiError::Port(PortError::InvalidPortRequest(format!(
                "port {port} is outside the managed range {}-{}: see `portgate status`",
                config.min_port, config.max_port
            ))));
        }
        Ok(PortId {
            netns,
            ..PortId::new(port, protocol(query)?)
        })
    }
}

/// A request on the port its URL names (`/v1/ports/{port}...?proto=`), as given: the port
/// and the query are checked when the call runs, so that a bad one is answered and audited
/// like any other error.
struct PortCall {
    caller: Caller,
    port: String,
    query: QueryMap,
}

impl FromRequestParts<Arc<App>> for PortCall {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Infallible> {
        let caller = Caller::from_request_parts(parts, app).await?;
        // Every route of a PortCall has a `{port}`: a missing one reads as an empty port.
        let port = UrlPath::<String>::from_request_parts(parts, app)
            .await
            .map_or_else(|_| String::new(), |UrlPath(port)| port);
        let query = Query::from_request_parts(parts, app).await;
        Ok(Self {
            caller,
            port,
            query,
        })
    }
}

impl PortCall {
    /// Answers `call`, given the port and the query, once both check out (the port goes
    /// into the audit record); `ok` on success.
    async fn answer<T: Serialize>(
        self,
        action: &'static str,
        ok: StatusCode,
        call: impl AsyncFnOnce(&App, PortId, HashMap<String, String>, &mut Audit) -> ApiResult<T>,
    ) -> Response {
        let Self {
            caller,
            port,
            query,
        } = self;
        caller
            .answer(action, ok, async |audit| {
                let query = query_map(query)?;
                let id = caller.port_id(&port, &query)?;
                audit.id = Some(id);
                audit.addr = query.get("ip").and_then(|ip| ip.parse().ok());
                call(&caller.app, id, query, audit).await
            })
            .await
    }

    /// [`PortCall::answer`] for a change to the port, made with the caller's rights.
    async fn change<T: Serialize>(
        self,
        action: &'static str,
        ok: StatusCode,
        call: impl AsyncFnOnce(&App, Actor, PortId, &mut Audit) -> ApiResult<T>,
    ) -> Response {
        let actor = self.caller.actor();
        self.answer(action, ok, async |app, id, _, audit| {
            call(app, actor?, id, audit).await
        })
        .await
    }
}

/// The query's `netns`: a cookie, or `host` (the default).
fn netns(query: &HashMap<String, String>) -> ApiResult<NetnsId> {
    match query.get("netns").map(String::as_str) {
        None => Ok(NetnsId::HOST),
        Some(name) if name == NetnsId::HOST_NAME => Ok(NetnsId::HOST),
        Some(raw) => raw.parse().map(NetnsId).map_err(|_| {
            ApiError::bad(
                "invalid_netns",
                format!(
                    "{raw:?} is not a namespace cookie: give the `netns` number `portgate list --json` shows, or leave it out for the host's"
                ),
            )
        }),
    }
}

fn protocol(query: &HashMap<String, String>) -> ApiResult<Protocol> {
    match query.get("proto") {
        None => Ok(Protocol::Tcp),
        Some(name) => name
            .parse()
            .map_err(|err: UnknownProtocol| ApiError::bad("invalid_proto", err.to_string())),
    }
}

/// Decodes a JSON body, with a message naming the field that is wrong.
fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| ApiError::Bad {
        status: rejection.status(),
        body: ErrorBody::bad_request(
            "bad_body",
            format!(
                "{}: a request body may have at most {MAX_BODY_BYTES} bytes, sent within {:?} of its head",
                rejection.body_text(),
                connections::BODY_TIMEOUT
            ),
        ),
    })?;
    decode_body(&bytes).map_err(|message| ApiError::bad("bad_json", message))
}

type QueryMap = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn query_map(query: QueryMap) -> ApiResult<HashMap<String, String>> {
    query
        .map(|Query(map)| map)
        .map_err(|rejection| ApiError::bad("bad_query", rejection.body_text()))
}

/// How a request the router cannot route is answered: its audit action, status, error
/// code and message.
struct Unrouted {
    action: &'static str,
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

/// A path with no route.
const UNKNOWN_ROUTE: Unrouted = Unrouted {
    action: "unknown_route",
    status: StatusCode::NOT_FOUND,
    code: "unknown_route",
    message: "no such API route: see the routes in the portgate docs (crate::api)",
};

/// A route asked with a method it does not take.
const WRONG_METHOD: Unrouted = Unrouted {
    action: "wrong_method",
    status: StatusCode::METHOD_NOT_ALLOWED,
    code: "method_not_allowed",
    message: "this route does not take that method: see the routes in the portgate docs (crate::api)",
};

/// Answers (and audits) a request the router cannot route.
async fn refuse(caller: Caller, unrouted: &Unrouted) -> Response {
    caller
        .answer(
            unrouted.action,
            StatusCode::OK,
            async |_| -> ApiResult<()> {
                Err(ApiError::Bad {
                    status: unrouted.status,
                    body: ErrorBody::bad_request(unrouted.code, unrouted.message),
                })
            },
        )
        .await
}

/// Runs every request's handler to completion (the change, its audit record and its
/// latency) even if the client goes away meanwhile: axum drops a handler whose connection
/// closes, and a change half-way (made but not yet audited, or not yet undone after a
/// failed commit) must not be abandoned.
async fn run_to_completion(request: Request, next: Next) -> Response {
    tokio::spawn(next.run(request)).await.unwrap_or_else(|err| {
        ApiError::Port(PortError::state(
            "the request did not finish; see the daemon's log",
            Some(Box::new(err)),
        ))
        .into_response()
    })
}
