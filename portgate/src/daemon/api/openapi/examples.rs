//! The document's examples: real answers of a daemon (and the requests that got them),
//! kept in `examples.json`. The tests decode each into its Rust type, so that an example
//! cannot drift from what the daemon reads and writes.

use std::sync::LazyLock;

use serde_json::Value;

/// Every example, by name, as `examples.json` holds it.
static EXAMPLES: LazyLock<serde_json::Map<String, Value>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("examples.json"))
        .unwrap_or_else(|err| panic!("examples.json is not a JSON object of examples: {err}"))
});

/// The example `name`; `null` when there is none (a test fails then).
#[must_use]
pub fn get(name: &str) -> Value {
    EXAMPLES.get(name).cloned().unwrap_or(Value::Null)
}

/// Every example's name.
pub fn names() -> impl Iterator<Item = &'static str> {
    EXAMPLES.keys().map(String::as_str)
}

/// Defines a function per example, for the `example = ...` of `#[utoipa::path]`.
macro_rules! examples {
    ($($name:ident),* $(,)?) => {
        $(
            #[doc = concat!("The example `", stringify!($name), "`.")]
            #[must_use]
            pub fn $name() -> Value {
                get(stringify!($name))
            }
        )*
    };
}

examples!(
    alloc_request,
    allocation,
    allocations,
    draining,
    renew_request,
    access_change,
    owner_spec,
    grant_request,
    grants,
    check,
    netns,
    key_request,
    key_created,
    keys,
    nodes,
    repair_request,
    repair,
    stats,
    events,
    status,
    metrics,
);
