//! Keys and knocks through the manager (no gate: the userspace mirror stands for it).

use std::{sync::Arc, time::Duration};

use super::{KeyRequest, KnockRefusal, unix_now};
use crate::{
    knock::{self, Knock, KnockError, Refused},
    manager::{
        Actor, PortError, PortManager,
        tests::{config, ip, manager, open},
    },
    model::{AllocationRequest, ClientKey, PortAccessControl, PortId, Protocol},
    store::{MemoryStore, Store},
};

/// A port that requires authentication.
async fn guarded(manager: &PortManager) -> PortId {
    manager
        .allocate(
            AllocationRequest {
                access: PortAccessControl {
                    require_authentication: true,
                    ..PortAccessControl::default()
                },
                ..AllocationRequest::new("db")
            },
            Actor::Admin,
        )
        .await
        .unwrap()
        .id
}

fn request(name: &str, ports: Vec<PortId>) -> KeyRequest {
    KeyRequest {
        name: name.to_owned(),
        ports,
        max_ttl: Duration::from_mins(2),
        any_source: false,
    }
}

/// A datagram of `key` for `id`, made at `timestamp`, with `nonce`.
fn datagram(key: &ClientKey, id: PortId, timestamp: u64, nonce: u8) -> Vec<u8> {
    signed_for(key, id, timestamp, nonce, None)
}

/// The same, naming `address` as the grant's.
fn signed_for(
    key: &ClientKey,
    id: PortId,
    timestamp: u64,
    nonce: u8,
    address: Option<std::net::IpAddr>,
) -> Vec<u8> {
    let knock = Knock {
        key_name: key.name.clone(),
        protocol: id.protocol,
        port: id.port,
        ttl: Duration::from_mins(10),
        timestamp,
        nonce: [nonce; 16],
        address,
    };
    knock::encode(&knock, &knock::Key(key.secret)).unwrap()
}

#[tokio::test]
async fn a_knock_opens_its_port_to_its_source_once_and_for_the_keys_longest_grant() {
    let manager = manager(config());
    let id = guarded(&manager).await;
    let key = manager
        .add_key(request("alice", vec![id]), Actor::Admin)
        .await
        .unwrap();
    let source = ip("192.0.2.9");
    assert!(manager.validate_connection(id, source).await.is_err());
    let now = unix_now();
    let bytes = datagram(&key, id, now, 1);
    let accepted = manager.knock(&bytes, source, now).await.unwrap();
    assert_eq!((accepted.id, accepted.addr), (id, source));
    assert_eq!(accepted.ttl, Duration::from_mins(2), "capped by the key");
    manager.validate_connection(id, source).await.unwrap();
    assert_eq!(
        manager.knock(&bytes, source, now + 1).await,
        Err(KnockRefusal::Replay {
            key: "alice".to_owned(),
            id,
            refused: Refused::Replayed
        }),
        "the same datagram again"
    );
}

#[tokio::test]
async fn knocks_are_refused_by_cause() {
    let manager = manager(config());
    let id = guarded(&manager).await;
    let other = PortId::new(id.port + 1, Protocol::Tcp);
    let key = manager
        .add_key(request("alice", vec![id]), Actor::Admin)
        .await
        .unwrap();
    let source = ip("192.0.2.9");
    let now = unix_now();
    let mut stranger = key.clone();
    stranger.name = "mallory".to_owned();
    let refusal = |bytes: Vec<u8>| {
        let manager = &manager;
        async move {
            manager
                .knock(&bytes, source, now)
                .await
                .unwrap_err()
                .reason()
        }
    };
    assert_eq!(
        refusal(datagram(&stranger, id, now, 1)).await,
        "unknown_key"
    );
    let mut forged = key.clone();
    forged.secret[0] ^= 1;
    assert_eq!(
        refusal(datagram(&forged, id, now, 2)).await,
        "bad_signature"
    );
    assert_eq!(refusal(datagram(&key, other, now, 3)).await, "not_covered");
    assert_eq!(refusal(datagram(&key, id, now - 31, 4)).await, "stale");
    assert_eq!(refusal(datagram(&key, id, now + 31, 5)).await, "future");
    let mut truncated = datagram(&key, id, now, 6);
    truncated.truncate(40);
    assert_eq!(refusal(truncated).await, "truncated");
    assert_eq!(
        manager.knock(&[0; 400], source, now).await,
        Err(KnockRefusal::Datagram(KnockError::Oversized(400)))
    );
    assert!(
        manager.validate_connection(id, source).await.is_err(),
        "nothing opened"
    );
}

#[tokio::test]
async fn keys_are_for_administrators_kept_by_the_store_and_revoked_with_their_grants() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let manager = open(config(), Arc::clone(&store));
    let id = guarded(&manager).await;
    assert!(matches!(
        manager
            .add_key(request("bob", vec![]), Actor::User(1000))
            .await,
        Err(PortError::AccessDenied(_))
    ));
    assert!(
        manager
            .add_key(request("b b", vec![]), Actor::Admin)
            .await
            .is_err()
    );
    let key = manager
        .add_key(request("bob", vec![]), Actor::Admin)
        .await
        .unwrap();
    assert!(
        manager
            .add_key(request("bob", vec![]), Actor::Admin)
            .await
            .is_err(),
        "a name is made once"
    );
    assert_eq!(store.load().unwrap().keys, vec![key.clone()], "durable");
    let now = unix_now();
    let source = ip("198.51.100.4");
    manager
        .knock(&datagram(&key, id, now, 1), source, now)
        .await
        .unwrap();
    manager.validate_connection(id, source).await.unwrap();

    manager.revoke_key("bob", Actor::Admin).await.unwrap();
    assert!(store.load().unwrap().keys.is_empty());
    assert!(
        manager.validate_connection(id, source).await.is_err(),
        "its grant is withdrawn"
    );
    assert_eq!(
        manager
            .knock(&datagram(&key, id, now, 2), source, now)
            .await
            .unwrap_err()
            .reason(),
        "unknown_key"
    );
    // A manager reopened on the store knows the keys it holds.
    let kept = manager
        .add_key(request("carol", vec![]), Actor::Admin)
        .await
        .unwrap();
    let reopened = open(config(), store);
    assert_eq!(reopened.keys().await, vec![kept]);
}

#[tokio::test]
async fn grants_are_listed_with_their_issuer_and_withdrawn_one_by_one() {
    let manager = manager(config());
    let id = guarded(&manager).await;
    let key = manager
        .add_key(request("dave", vec![id]), Actor::Admin)
        .await
        .unwrap();
    let now = unix_now();
    manager
        .knock(&datagram(&key, id, now, 1), ip("192.0.2.1"), now)
        .await
        .unwrap();
    manager
        .grant(id, ip("192.0.2.2"), Duration::from_mins(1), Actor::Admin)
        .await
        .unwrap();
    let listed: Vec<(String, String)> = manager
        .grants(id, Actor::Admin)
        .await
        .unwrap()
        .into_iter()
        .map(|grant| {
            (
                grant.addr.to_string(),
                grant.issued_by.map(|by| by.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("192.0.2.1".to_owned(), "key dave".to_owned()),
            ("192.0.2.2".to_owned(), "administrator".to_owned())
        ]
    );
    assert!(matches!(
        manager.grants(id, Actor::User(4242)).await,
        Err(PortError::AccessDenied(_))
    ));
    manager
        .revoke_grant(id, ip("192.0.2.2"), Actor::Admin)
        .await
        .unwrap();
    assert!(
        manager
            .validate_connection(id, ip("192.0.2.2"))
            .await
            .is_err()
    );
    manager
        .validate_connection(id, ip("192.0.2.1"))
        .await
        .unwrap();
    assert!(
        manager
            .revoke_grant(id, ip("192.0.2.2"), Actor::Admin)
            .await
            .is_err(),
        "no grant left to withdraw"
    );
}

#[tokio::test]
async fn a_knock_is_refused_where_no_authentication_is_required_and_for_an_address_not_its_own() {
    let manager = manager(config());
    let open_port = manager
        .allocate(AllocationRequest::new("web"), Actor::Admin)
        .await
        .unwrap()
        .id;
    let id = guarded(&manager).await;
    let key = manager
        .add_key(request("erin", vec![]), Actor::Admin)
        .await
        .unwrap();
    let (source, elsewhere) = (ip("192.0.2.7"), ip("192.0.2.8"));
    let now = unix_now();
    assert_eq!(
        manager
            .knock(&datagram(&key, open_port, now, 1), source, now)
            .await
            .unwrap_err()
            .reason(),
        "auth_not_required",
        "a key for every port opens only those that require authentication"
    );
    assert_eq!(
        manager
            .knock(&signed_for(&key, id, now, 2, Some(elsewhere)), source, now)
            .await
            .unwrap_err()
            .reason(),
        "address_not_allowed"
    );
    // Its own address, signed, is what the client sends by default.
    let accepted = manager
        .knock(&signed_for(&key, id, now, 3, Some(source)), source, now)
        .await
        .unwrap();
    assert_eq!(accepted.addr, source);
    assert!(manager.validate_connection(id, elsewhere).await.is_err());
}

#[tokio::test]
async fn a_knock_never_shortens_an_administrators_grant_nor_takes_it_over() {
    let manager = manager(config());
    let id = guarded(&manager).await;
    let mut asked = request("frank", vec![id]);
    asked.any_source = true;
    let key = manager.add_key(asked, Actor::Admin).await.unwrap();
    let granted = ip("192.0.2.20");
    manager
        .grant(id, granted, Duration::from_hours(1), Actor::Admin)
        .await
        .unwrap();
    let now = unix_now();
    manager
        .knock(
            &signed_for(&key, id, now, 1, Some(granted)),
            ip("192.0.2.30"),
            now,
        )
        .await
        .unwrap();
    let grant = manager.grants(id, Actor::Admin).await.unwrap().remove(0);
    assert!(grant.expires_in > Duration::from_mins(59), "not shortened");
    assert_eq!(
        grant.issued_by.map(|by| by.to_string()).as_deref(),
        Some("administrator")
    );
    // Nor one that ends sooner than the knock asks: it is the administrator's still.
    let briefly = ip("192.0.2.21");
    manager
        .grant(id, briefly, Duration::from_secs(30), Actor::Admin)
        .await
        .unwrap();
    manager
        .knock(
            &signed_for(&key, id, now, 2, Some(briefly)),
            ip("192.0.2.30"),
            now,
        )
        .await
        .unwrap();
    let grants = manager.grants(id, Actor::Admin).await.unwrap();
    let brief = grants.iter().find(|grant| grant.addr == briefly).unwrap();
    assert!(brief.expires_in <= Duration::from_secs(30));
    assert_eq!(
        brief.issued_by.as_ref().map(ToString::to_string).as_deref(),
        Some("administrator")
    );
    manager.revoke_key("frank", Actor::Admin).await.unwrap();
    manager.validate_connection(id, granted).await.unwrap();
    manager.validate_connection(id, briefly).await.unwrap();
}

#[tokio::test]
async fn a_knock_taken_before_a_restart_is_refused_after_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let manager = open(config(), Arc::clone(&store));
    let id = guarded(&manager).await;
    let key = manager
        .add_key(request("grace", vec![id]), Actor::Admin)
        .await
        .unwrap();
    let (source, now) = (ip("192.0.2.40"), unix_now());
    let taken = datagram(&key, id, now, 1);
    manager.knock(&taken, source, now).await.unwrap();
    assert_eq!(
        store.load().unwrap().keys[0].last_knock,
        now,
        "kept before the grant"
    );
    let reopened = open(config(), store);
    assert_eq!(
        reopened
            .knock(&taken, source, now)
            .await
            .unwrap_err()
            .reason(),
        "before_restart"
    );
    reopened
        .knock(&datagram(&key, id, now + 1, 2), source, now + 1)
        .await
        .expect("a later knock is taken");
}

#[tokio::test]
async fn a_keys_ports_are_bounded_and_each_listed_once() {
    let manager = manager(config());
    let id = PortId::new(20_000, Protocol::Tcp);
    assert!(matches!(
        manager
            .add_key(
                request("zero", vec![PortId::new(0, Protocol::Tcp)]),
                Actor::Admin
            )
            .await,
        Err(PortError::InvalidPortRequest(_))
    ));
    let many: Vec<PortId> = (1..=1_025)
        .map(|port| PortId::new(port, Protocol::Udp))
        .collect();
    assert!(matches!(
        manager.add_key(request("many", many), Actor::Admin).await,
        Err(PortError::InvalidPortRequest(_))
    ));
    let key = manager
        .add_key(request("twice", vec![id, id]), Actor::Admin)
        .await
        .unwrap();
    assert_eq!(key.ports, vec![id]);
}
