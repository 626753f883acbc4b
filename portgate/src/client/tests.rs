//! The client against a router standing in for the daemon.

use std::{
    collections::HashMap,
    convert::Infallible,
    ops::ControlFlow,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::Query,
    http::StatusCode,
    routing::{get, post},
};
use hyper::body::{Bytes, Frame};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{
    ClientError,
    testing::{netns_route, serve, view},
};
use crate::{
    api::{AllocRequest, CheckResponse, ErrorBody, EventView},
    manager::PortError,
    model::{NetnsId, PortId, Protocol},
};

#[tokio::test]
async fn alloc_round_trip() {
    let sent = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&sent);
    let router = Router::new().route(
        "/v1/ports",
        post(move |Json(body): Json<serde_json::Value>| async move {
            *seen.lock().expect("lock") = Some(body);
            (StatusCode::CREATED, Json(view(20001)))
        }),
    );
    let (_dir, client) = serve(router).await;
    let request = AllocRequest {
        owner: "web".to_owned(),
        port: Some(20001),
        proto: Some(Protocol::Tcp),
        allow: vec!["10.0.0.0/8".parse().expect("a prefix")],
        max_conns: Some(5),
        require_auth: true,
        ttl: Some(Duration::from_mins(5)),
        ..AllocRequest::default()
    };

    let answer = client.alloc(&request).await.expect("the allocation");

    assert_eq!(answer, view(20001));
    let sent = sent.lock().expect("lock").take().expect("a request body");
    assert_eq!(
        sent,
        json!({
            "owner": "web", "port": 20001, "proto": "tcp", "cgroup": null, "pid": null,
            "allow": ["10.0.0.0/8"], "max_conns": 5, "require_auth": true, "ttl": "5m",
        })
    );
}

#[tokio::test]
async fn error_answer_carries_the_daemons_message() {
    let router = Router::new().route(
        "/v1/ports/{port}",
        get(|Query(query): Query<HashMap<String, String>>| async move {
            assert_eq!(query.get("proto").map(String::as_str), Some("udp"));
            let err = PortError::NotAllocated(PortId::new(20001, Protocol::Udp));
            (StatusCode::NOT_FOUND, Json(ErrorBody::of(&err)))
        }),
    );
    let (_dir, client) = serve(router).await;

    let err = client
        .show(PortId::new(20001, Protocol::Udp))
        .await
        .expect_err("the daemon refuses");

    assert_eq!(
        err.to_string(),
        "port 20001/udp is not allocated: see `portgate list`"
    );
    let ClientError::Daemon { status, code, .. } = err else {
        panic!("expected the daemon's error, got {err:?}");
    };
    assert_eq!((status, code.as_str()), (404, "not_allocated"));
}

#[tokio::test]
async fn an_error_without_error_body_is_a_bad_answer() {
    let (_dir, client) = serve(Router::new()).await;

    let err = client.list().await.expect_err("no such route");

    assert!(
        matches!(err, ClientError::BadAnswer { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("GET /v1/ports"), "{err}");
}

#[tokio::test]
async fn a_missing_socket_says_to_start_the_daemon() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("absent.sock");
    let client = super::Client::new(&socket);

    let err = client.list().await.expect_err("nothing listens");

    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("is the daemon running?"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test]
async fn check_denied_is_an_answer() {
    let router = Router::new().route(
        "/v1/ports/{port}/check",
        get(|Query(query): Query<HashMap<String, String>>| async move {
            Json(CheckResponse {
                id: PortId::from(20001),
                ip: query["ip"].parse().expect("an address"),
                allowed: false,
                reason: Some("not_allowed".to_owned()),
                message: Some("not in the allowlist".to_owned()),
                warning: None,
            })
        }),
    );
    let (_dir, client) = serve(router).await;

    let answer = client
        .check(
            PortId::from(20001),
            "2001:db8::9".parse().expect("an address"),
        )
        .await
        .expect("an answer");

    assert!(!answer.allowed);
    assert_eq!(answer.ip.to_string(), "2001:db8::9");
}

/// A response body fed chunk by chunk from the test.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn event(port: u16) -> EventView {
    EventView {
        time: 1_700_000_000_000 + u64::from(port),
        id: PortId::from(port),
        netns_label: None,
        addr: "10.0.0.9".parse().expect("an address"),
        reason: "not_allowed".to_owned(),
        hook: "xdp".to_owned(),
        cgroup_id: 0,
        pid: 0,
    }
}

#[tokio::test]
async fn events_arrive_as_they_stream() {
    let (chunks, body) = mpsc::unbounded_channel();
    let body = Arc::new(Mutex::new(Some(body)));
    let router = Router::new().route(
        "/v1/events",
        get(move |Query(query): Query<HashMap<String, String>>| {
            assert_eq!(query.get("follow").map(String::as_str), Some("true"));
            let body = body.lock().expect("lock").take().expect("one request");
            async move { axum::body::Body::new(ChannelBody(body)) }
        }),
    );
    let (_dir, client) = serve(router).await;
    let lines: Vec<String> = [20001, 20002, 20003]
        .map(|port| serde_json::to_string(&event(port)).expect("JSON") + "\n")
        .into();
    // The first line and half the second; the rest only once the first event is seen,
    // so a client that waited for the end would never get there.
    let (first_seen, first_seen_rx) = oneshot::channel();
    let (second_head, second_tail) = lines[1].split_at(10);
    chunks
        .send(Bytes::from(lines[0].clone() + second_head))
        .expect("send");
    let rest = Bytes::from(second_tail.to_owned() + &lines[2]);
    let feeder = tokio::spawn(async move {
        first_seen_rx.await.expect("the first event");
        chunks.send(rest).expect("send");
        // Dropping `chunks` ends the stream.
    });

    let mut seen = Vec::new();
    let mut first_seen = Some(first_seen);
    tokio::time::timeout(
        Duration::from_secs(10),
        client.events(true, |event| {
            seen.push(event);
            if let Some(signal) = first_seen.take() {
                signal.send(()).expect("the feeder waits");
            }
            ControlFlow::Continue(())
        }),
    )
    .await
    .expect("events were delivered before the stream ended")
    .expect("the stream");
    feeder.await.expect("the feeder");

    assert_eq!(seen, vec![event(20001), event(20002), event(20003)]);
}

#[tokio::test]
async fn a_namespace_name_is_sent_whole() {
    let (_dir, client) = serve(netns_route()).await;

    let found = client
        .netns("net:[4026532999]")
        .await
        .expect("the namespace");
    assert_eq!(found.netns, NetnsId(4097));

    let err = client.netns("a b&c").await.expect_err("no such namespace");
    assert_eq!(
        err.to_string(),
        r#"no allocation's namespace is labelled "a b&c""#
    );
    assert!(
        matches!(err, ClientError::Daemon { status: 404, ref code, .. } if code == "unknown_netns"),
        "{err:?}"
    );
}
