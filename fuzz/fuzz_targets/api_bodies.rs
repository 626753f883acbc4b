//! Every API request body, on any bytes, through what the daemon does before the manager
//! is asked ([`portgate::api::checks`]): the decoding and the owner checks, then the
//! manager's own check of an access control. Nothing may panic; what is accepted must be
//! within its bounds, and must encode and decode back to itself, as the CLI sends it.
//!
//! Each input is tried as the body of every route that takes one.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use portgate::{
    api::{
        AccessChange, AllocRequest, GrantRequest, KeyRequestBody, OwnerSpec, RenewRequest,
        RepairRequest, decode_body,
    },
    knock,
    manager::security::{MAX_ALLOWED_IPS, PortSecurity},
    model::{PortAccessControl, Protocol},
};
use serde::{Serialize, de::DeserializeOwned};

/// Decodes `data` as a `T`; one accepted encodes and decodes back to itself.
fn accepted<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = match decode_body(data) {
        Ok(value) => value,
        Err(message) => {
            assert!(message.starts_with("the request body"), "{message}");
            return None;
        }
    };
    let encoded = serde_json::to_vec(&value).expect("an accepted body encodes");
    let again: T = decode_body(&encoded)
        .unwrap_or_else(|err| panic!("{value:?} encodes as a body it refuses: {err}"));
    assert_eq!(again, value, "a body changes through its encoding");
    Some(value)
}

/// An access control the manager accepts for a port of `protocol` is within its bounds.
fn check_access(protocol: Protocol, access: &PortAccessControl) {
    if PortSecurity::check_access_control(protocol, access).is_ok() {
        assert!(access.allowed_ips.len() <= MAX_ALLOWED_IPS);
        assert!(protocol == Protocol::Tcp || access.max_connections == 0);
    }
}

/// An owner spec that passes its check names at most one owner, a namespace only beside a
/// cgroup, and a cgroup by an absolute path.
fn check_owner(spec: &OwnerSpec) {
    let named = [
        spec.cgroup.is_some(),
        spec.pid.is_some(),
        spec.container.is_some(),
    ];
    if spec.check().is_ok() {
        assert!(named.iter().filter(|given| **given).count() <= 1);
        assert!(spec.netns.is_none() || (spec.pid.is_none() && spec.container.is_none()));
        assert!(spec.cgroup.as_ref().is_none_or(|path| path.is_absolute()));
    }
    if spec.check_new_owner().is_ok() {
        assert!(spec.netns.is_none() && named.contains(&true));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(request) = accepted::<AllocRequest>(data) {
        check_owner(&request.owner_spec());
        let access = request.access();
        // The allowlist holds each network once: never more prefixes than were given.
        assert!(access.allowed_ips.len() <= request.allow.len());
        assert_eq!(access.max_connections, request.max_conns.unwrap_or(0));
        check_access(request.proto.unwrap_or(Protocol::Tcp), &access);
    }
    if let Some(spec) = accepted::<OwnerSpec>(data) {
        check_owner(&spec);
    }
    if let Some(change) = accepted::<AccessChange>(data) {
        // Applied to an empty access control: what it removes is absent, unless it
        // removes nothing; applied, it holds what it adds.
        match change.apply(&PortAccessControl::default()) {
            Ok(access) => {
                assert!(change.remove.is_empty());
                assert_eq!(access.allowed_ips, change.allow);
                for protocol in Protocol::ALL {
                    check_access(protocol, &access);
                }
            }
            Err(absent) => assert!(change.remove.contains(&absent)),
        }
    }
    // An empty renewal body is the default renewal (the handler's own rule).
    let _: Option<RenewRequest> = accepted(data);
    let _: Option<GrantRequest> = accepted(data);
    if let Some(request) = accepted::<KeyRequestBody>(data)
        && knock::valid_key_name(&request.name)
    {
        assert!((1..=knock::MAX_KEY_NAME).contains(&request.name.len()));
        assert!(request.name.is_ascii());
    }
    let _: Option<RepairRequest> = accepted(data);
});
