//! The views of the whole daemon: stats, the event stream, status, metrics.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::stream;
use serde::Serialize;

use super::{
    ApiError, Caller, QueryMap, netns,
    openapi::{BadRequest, Busy, Failed, PortQuery, examples},
    protocol, query_map,
};
use crate::{
    api::{ErrorBody, EventView, RangeUsage, StatusView},
    daemon::App,
    model::{NetnsId, PortReport, PortStatus},
};

/// The kernel's view of every managed port, or of one (`?port=`).
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "monitoring",
    operation_id = "stats",
    params(
        ("port" = Option<u16>, Query, description = "Only this port", minimum = 1, maximum = 65535),
        PortQuery,
    ),
    responses(
        (status = 200, description = "The ports' policies, grants and counters", body = Vec<PortReport>, example = examples::stats),
        BadRequest, Failed, Busy,
    ),
)]
pub(super) async fn stats(caller: Caller, query: QueryMap) -> Response {
    caller
        .answer("stats", StatusCode::OK, async |audit| {
            let query = query_map(query)?;
            let only = if let Some(port) = query.get("port") {
                Some(caller.port_id(port, &query)?)
            } else {
                // Without a port they select nothing, but a wrong one is still wrong.
                protocol(&query)?;
                netns(&query)?;
                None
            };
            audit.id = only;
            let manager = &caller.app.manager;
            Ok(match only {
                Some(id) => manager.report(id).await?.into_iter().collect(),
                None => manager.reports().await?,
            })
        })
        .await
}

/// The recent deny events, then (`?follow=true`) each new one: JSON lines.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "monitoring",
    operation_id = "events",
    params(
        ("follow" = Option<bool>, Query, description = "`true`: keep the answer open and send each new event (until the daemon stops)"),
    ),
    responses(
        (status = 200, description = "One `EventView` a line", content_type = "application/x-ndjson", body = String, example = examples::events),
        (status = 400, description = "The query is wrong (`bad_query`)", body = ErrorBody),
        Busy,
    ),
)]
pub(super) async fn events(caller: Caller, query: QueryMap) -> Response {
    let follow = match query_map(query).and_then(|query| follow(&query)) {
        Ok(follow) => follow,
        Err(err) => {
            return caller
                .answer("events", StatusCode::OK, async |_| -> Result<(), _> {
                    Err(err)
                })
                .await;
        }
    };
    let app = &caller.app;
    let receiver = app.manager.monitor().subscribe();
    let mut labels = NetnsLabels::default();
    let mut recent = Vec::new();
    for (time, event) in app.manager.monitor().recent_events() {
        let label = labels.of(app, event.id.netns).await;
        recent.push(json_line(&EventView::new(&event, time, label)));
    }
    caller.record(super::Audit::started("events"), StatusCode::OK, "ok");
    let head = stream::iter(recent.into_iter().map(Ok::<_, std::io::Error>));
    let body = if follow {
        let shutdown = app.shutdown.clone();
        let tail = stream::unfold(
            (receiver, shutdown, Arc::clone(app), labels),
            |(mut receiver, mut shutdown, app, mut labels)| async move {
                loop {
                    tokio::select! {
                        event = receiver.recv() => match event {
                            Ok((time, event)) => {
                                let label = labels.of(&app, event.id.netns).await;
                                let line = json_line(&EventView::new(&event, time, label));
                                return Some((Ok(line), (receiver, shutdown, app, labels)));
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        },
                        _ = shutdown.changed() => return None,
                    }
                }
            },
        );
        Body::from_stream(futures_util::StreamExt::chain(head, tail))
    } else {
        Body::from_stream(head)
    };
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// The query's `follow`: `true` keeps the answer open, `false` or none ends it.
fn follow(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    match query.get("follow").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(raw) => Err(ApiError::bad(
            "bad_query",
            format!("follow={raw:?} is not a boolean: give true or false"),
        )),
    }
}

/// The labels of the namespaces events name, as their allocations label them. A cookie's
/// label never changes (cookies are not reused), so the allocations are read again only for
/// a namespace not seen yet.
#[derive(Default)]
struct NetnsLabels(BTreeMap<NetnsId, Option<String>>);

impl NetnsLabels {
    /// The label of `netns`; `None` for the host's, or when no allocation is in it.
    async fn of(&mut self, app: &App, netns: NetnsId) -> Option<String> {
        if netns.is_host() {
            return None;
        }
        if !self.0.contains_key(&netns) {
            for (held, _) in app.manager.allocations().await {
                let label = held.netns_label().map(str::to_owned);
                self.0.entry(held.id.netns).or_insert(label);
            }
            self.0.entry(netns).or_insert(None);
        }
        self.0.get(&netns).cloned().flatten()
    }
}

fn json_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The daemon's status.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "monitoring",
    operation_id = "status",
    responses(
        (status = 200, description = "The status", body = StatusView, example = examples::status),
        Failed, Busy,
    ),
)]
pub(super) async fn status(caller: Caller) -> Response {
    caller
        .answer("status", StatusCode::OK, async |_| {
            let app = &caller.app;
            let allocations = app.manager.allocations().await;
            let usage = app
                .manager
                .free_ports()
                .await
                .into_iter()
                .map(|(protocol, free)| {
                    let count = |status: PortStatus| {
                        allocations
                            .iter()
                            .filter(|(held, _)| {
                                held.id.protocol == protocol && held.status == status
                            })
                            .count() as u64
                    };
                    RangeUsage {
                        proto: protocol,
                        active: count(PortStatus::Active),
                        draining: count(PortStatus::Draining),
                        closed: count(PortStatus::Closed),
                        free,
                    }
                })
                .collect();
            let config = app.manager.config();
            Ok(StatusView {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                uptime_secs: app.started.elapsed().as_secs(),
                min_port: config.min_port,
                max_port: config.max_port,
                reserved_ports: config.reserved_ports.clone(),
                kernel_gate: app.manager.has_gate().await,
                pin_dir: app.config.daemon.pin_dir.clone(),
                attachments: app.manager.attachments().await?,
                store: app.manager.store().describe(),
                usage,
                owner_gone: app.manager.owner_gone().await,
                unexplained_listeners: app.start_report.unexplained_listeners.clone(),
                warnings: app
                    .warnings
                    .iter()
                    .cloned()
                    .chain(app.manager.gate_warnings().await?)
                    .chain(app.manager.proxy_warnings().await)
                    .collect(),
                fleet: fleet_view(app),
            })
        })
        .await
}

/// The node's place in its fleet, in fleet mode.
fn fleet_view(app: &crate::daemon::App) -> Option<crate::api::FleetView> {
    let cluster = app.config.cluster.as_ref()?;
    Some(app.manager.fleet_status().map_or_else(
        || crate::api::FleetView {
            node: cluster.node_name().unwrap_or_default(),
            joined: false,
            reachable: false,
            revision: 0,
            behind: 0,
        },
        |status| crate::api::FleetView {
            node: status.node,
            joined: status.synced,
            reachable: status.reachable,
            revision: status.applied,
            behind: status.behind,
        },
    ))
}

/// The Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    operation_id = "metrics",
    responses(
        (status = 200, description = "The OpenMetrics text exposition", content_type = "application/openmetrics-text", body = String, example = examples::metrics),
        Failed, Busy,
    ),
)]
pub(super) async fn metrics(caller: Caller) -> Response {
    match caller.app.manager.metrics_text().await {
        Ok(text) => {
            caller.record(super::Audit::started("metrics"), StatusCode::OK, "ok");
            metrics_response(caller.app.connections.append_metrics(text))
        }
        Err(err) => {
            caller
                .answer(
                    "metrics",
                    StatusCode::OK,
                    async |_| -> Result<(), ApiError> { Err(err.into()) },
                )
                .await
        }
    }
}

/// A Prometheus text exposition answer.
#[must_use]
pub fn metrics_response(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The router of the metrics address (`GET /metrics`, no credentials: bind it to loopback).
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(app): State<Arc<App>>| async move {
                match app.manager.metrics_text().await {
                    Ok(text) => metrics_response(app.connections.append_metrics(text)),
                    Err(err) => ApiError::Port(err).into_response(),
                }
            }),
        )
        .with_state(app)
}
