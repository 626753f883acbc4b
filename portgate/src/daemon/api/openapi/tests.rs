use std::path::PathBuf;

use serde::de::DeserializeOwned;

use super::{document, document_json, examples};
use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, EventView, GrantInfoView, GrantRequest,
        KeyCreated, KeyRequestBody, KeyView, NetnsView, NodeView, OwnerSpec, RenewRequest,
        RepairRequest, RepairView, StatusView,
    },
    model::{AccessChange, PortReport},
};

/// `docs/openapi.json`, from this crate's directory.
fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

/// The committed document is the one the code makes; `PORTGATE_BLESS=1` writes it anew.
#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = document_json();
    let path = committed_path();
    if std::env::var_os("PORTGATE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the document the code makes: regenerate it with `PORTGATE_BLESS=1 cargo test -p portgate --lib openapi` and commit it",
        path.display()
    );
}

/// Decodes example `name` as a `T`, or names what is wrong.
fn decodes<T: DeserializeOwned>(name: &str) {
    let value = examples::get(name);
    assert!(!value.is_null(), "example {name} is missing");
    if let Err(err) = serde_json::from_value::<T>(value) {
        panic!("example {name} does not decode: {err}");
    }
}

/// Every example is what the daemon reads or writes: each decodes into its Rust type, so
/// an example cannot drift from the types (nor from the answers it was taken from).
#[test]
fn every_example_decodes_into_its_type() {
    decodes::<AllocRequest>("alloc_request");
    decodes::<AllocationView>("allocation");
    decodes::<Vec<AllocationView>>("allocations");
    decodes::<AllocationView>("draining");
    decodes::<RenewRequest>("renew_request");
    decodes::<AccessChange>("access_change");
    decodes::<OwnerSpec>("owner_spec");
    decodes::<GrantRequest>("grant_request");
    decodes::<Vec<GrantInfoView>>("grants");
    decodes::<CheckResponse>("check");
    decodes::<NetnsView>("netns");
    decodes::<KeyRequestBody>("key_request");
    decodes::<KeyCreated>("key_created");
    decodes::<Vec<KeyView>>("keys");
    decodes::<Vec<NodeView>>("nodes");
    decodes::<RepairRequest>("repair_request");
    decodes::<RepairView>("repair");
    decodes::<Vec<PortReport>>("stats");
    decodes::<StatusView>("status");
    let events = examples::get("events");
    let events = events.as_str().expect("events is the text of JSON lines");
    assert!(!events.is_empty());
    for line in events.lines() {
        serde_json::from_str::<EventView>(line)
            .unwrap_or_else(|err| panic!("event line {line:?} does not decode: {err}"));
    }
    let metrics = examples::get("metrics");
    let metrics = metrics.as_str().expect("metrics is the exposition's text");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    // No example without a check above.
    assert_eq!(examples::names().count(), 21);
}

/// Every operation has an example answer, and a request body an example.
#[test]
fn every_operation_has_its_examples() {
    let document = serde_json::to_value(document()).unwrap();
    let paths = document["paths"].as_object().unwrap();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let answered = responses.iter().any(|(status, response)| {
                status.starts_with('2')
                    && (status == "204"
                        || response["content"].as_object().is_some_and(|content| {
                            content.values().all(|media| !media["example"].is_null())
                        }))
            });
            let path_and_method = format!("{method} {path}");
            assert!(
                answered || path_and_method == "get /v1/openapi.json",
                "{path_and_method} has no example answer"
            );
            if let Some(body) = operation.get("requestBody") {
                assert!(
                    body["content"]["application/json"]["example"].is_object(),
                    "{path_and_method} has no example request"
                );
            }
        }
    }
}
