//! `GET /v1/netns?name=`: the namespace a name given on the command line (`--netns`)
//! means, so that the CLI can name a port's namespace as the views show it.

use std::{collections::BTreeSet, path::Path};

use axum::{http::StatusCode, response::Response};

use super::{
    ApiError, ApiResult, Caller, QueryMap,
    openapi::{Busy, Failed, examples},
    placement, query_map,
};
use crate::{
    api::{ErrorBody, NetnsView},
    host::netns,
    manager::{Actor, PortError},
    model::{Allocation, NetnsId},
};

/// The namespace a name means: `host`, an allocation's label, a cookie, or a path
/// (administrators only).
#[utoipa::path(
    get,
    path = "/v1/netns",
    tag = "management",
    operation_id = "netns",
    params(
        ("name" = String, Query, description = "A label, a cookie, `host`, or a path", example = "host"),
    ),
    responses(
        (status = 200, description = "The namespace", body = NetnsView, example = examples::netns),
        (status = 400, description = "The name is missing or not a namespace (`missing_name`, `invalid_netns`, `ambiguous_netns`)", body = ErrorBody),
        (status = 403, description = "Only an administrator may name a namespace by path (`access_denied`)", body = ErrorBody),
        (status = 404, description = "No such namespace (`unknown_netns`)", body = ErrorBody),
        Failed, Busy,
    ),
)]
pub(super) async fn find(caller: Caller, query: QueryMap) -> Response {
    caller
        .answer("netns", StatusCode::OK, async |_| {
            let query = query_map(query)?;
            let name = query.get("name").ok_or_else(|| {
                ApiError::bad(
                    "missing_name",
                    "give the namespace as ?name=NAME: a label of `portgate list`, a cookie, or a path",
                )
            })?;
            let held: Vec<Allocation> = caller
                .app
                .manager
                .allocations()
                .await
                .into_iter()
                .map(|(held, _)| held)
                .collect();
            if name.contains('/') {
                by_path(Path::new(name), &held, caller.actor()?)
            } else {
                by_name(name, &held)
            }
        })
        .await
}

/// `host`, an allocation's label, or the cookie of an allocation's namespace; labels first.
fn by_name(name: &str, held: &[Allocation]) -> ApiResult<NetnsView> {
    if name == NetnsId::HOST_NAME {
        return Ok(host());
    }
    let labelled: BTreeSet<NetnsId> = held
        .iter()
        .filter(|held| held.netns_label() == Some(name))
        .map(|held| held.id.netns)
        .collect();
    let mut labelled = labelled.into_iter();
    match (labelled.next(), labelled.next()) {
        (Some(netns), None) => {
            return Ok(NetnsView {
                netns,
                label: name.to_owned(),
            });
        }
        (Some(first), Some(second)) => {
            return Err(ApiError::bad(
                "ambiguous_netns",
                format!(
                    "{name:?} labels more than one namespace (cookies {}, {}, ...): give the cookie (`netns` of `portgate list -o json`)",
                    first.0, second.0
                ),
            ));
        }
        (None, _) => {}
    }
    match name.parse().map(NetnsId) {
        Ok(netns) if netns.is_host() => Ok(host()),
        Ok(netns) => held
            .iter()
            .find(|held| held.id.netns == netns)
            .map(|held| view(netns, held.netns_label()))
            .ok_or_else(|| unknown(name)),
        Err(_) => Err(unknown(name)),
    }
}

/// The namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`), labelled as its
/// allocations label it. Only an admin may name one by path: the daemon opens it as root.
fn by_path(path: &Path, held: &[Allocation], actor: Actor) -> ApiResult<NetnsView> {
    if actor != Actor::Admin {
        return Err(ApiError::Port(PortError::AccessDenied(
            "only an admin may name a namespace by path: give its label (the NETNS column of `portgate list`) or its cookie".to_owned(),
        )));
    }
    if !path.is_absolute() {
        return Err(ApiError::bad(
            "invalid_netns",
            format!(
                "{} is not an absolute path: give /run/netns/NAME or /proc/PID/ns/net",
                path.display()
            ),
        ));
    }
    let found = netns::open(path).map_err(|err| match err {
        netns::NetnsError::Missing { .. } => ApiError::Bad {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody::bad_request("unknown_netns", err.to_string()),
        },
        err => ApiError::bad("invalid_netns", err.to_string()),
    })?;
    let Some(found) = placement::not_the_hosts(path.to_owned(), found)? else {
        return Ok(host());
    };
    let known = held
        .iter()
        .find(|held| held.id.netns == found.id)
        .and_then(Allocation::netns_label);
    Ok(view(found.id, Some(known.unwrap_or(&found.info.label))))
}

fn view(netns: NetnsId, label: Option<&str>) -> NetnsView {
    NetnsView {
        netns,
        label: netns.name(label),
    }
}

fn host() -> NetnsView {
    view(NetnsId::HOST, None)
}

fn unknown(name: &str) -> ApiError {
    ApiError::Bad {
        status: StatusCode::NOT_FOUND,
        body: ErrorBody::bad_request(
            "unknown_netns",
            format!(
                "no allocation's namespace is labelled {name:?} or has that cookie: give a label from the NETNS column of `portgate list`, a cookie, or a path (/run/netns/NAME, /proc/PID/ns/net)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::by_name;
    use crate::model::{Allocation, NetnsId, NetnsInfo, Protocol, sample_allocation};

    /// An allocation of port 80 in the namespace `cookie` labelled `label`.
    fn inside(cookie: u64, label: &str) -> Allocation {
        let mut held = sample_allocation(80, Protocol::Tcp);
        held.id.netns = NetnsId(cookie);
        held.netns = Some(NetnsInfo {
            label: label.to_owned(),
            inode: 4_026_532_000 + cookie,
        });
        held
    }

    fn code(name: &str, held: &[Allocation]) -> String {
        match by_name(name, held) {
            Ok(view) => panic!("{name:?} means {view:?}"),
            Err(err) => err.code(),
        }
    }

    #[test]
    fn a_label_then_a_cookie_name_a_namespace() {
        // "4098" is the label of one namespace and the cookie of another: labels first.
        let held = [
            sample_allocation(20001, Protocol::Tcp),
            inside(4097, "4098"),
            inside(4098, "web1"),
        ];
        let found = by_name("web1", &held).unwrap();
        assert_eq!((found.netns, found.label.as_str()), (NetnsId(4098), "web1"));
        let found = by_name("4098", &held).unwrap();
        assert_eq!((found.netns, found.label.as_str()), (NetnsId(4097), "4098"));
        let found = by_name("4097", &held).unwrap();
        assert_eq!((found.netns, found.label.as_str()), (NetnsId(4097), "4098"));
        for host in ["host", "0"] {
            let found = by_name(host, &held).unwrap();
            assert_eq!((found.netns, found.label.as_str()), (NetnsId::HOST, "host"));
        }
    }

    #[test]
    fn a_name_nothing_has_is_not_found() {
        let held = [inside(4097, "web1")];
        assert_eq!(code("web2", &held), "unknown_netns");
        assert_eq!(code("4099", &held), "unknown_netns");
        let err = by_name("web2", &held).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_label_of_two_namespaces_asks_for_the_cookie() {
        // A namespace labelled by its inode, gone, and another given the inode again.
        let held = [
            inside(4097, "net:[4026532999]"),
            inside(4098, "net:[4026532999]"),
        ];
        assert_eq!(code("net:[4026532999]", &held), "ambiguous_netns");
        assert_eq!(by_name("4098", &held).unwrap().netns, NetnsId(4098));
    }
}
