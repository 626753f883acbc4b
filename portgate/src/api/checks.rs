//! The checks a request body passes in the daemon before the manager is asked: its
//! decoding, with the field that is wrong named, and the shape of the owner it names. Pure
//! functions: the handlers call them, and so does the fuzz target `api_bodies`
//! (`fuzz/fuzz_targets/api_bodies.rs`), which holds every body type to them.

use serde::de::DeserializeOwned;

use super::OwnerSpec;

/// Decodes a JSON request body as the daemon does; `Err` is the message of its
/// `bad_json` answer, naming the field that is wrong. A body is exactly one JSON object.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    // Every body is an object: serde would also take an array for a struct (`[]` as an
    // empty change), which no client means.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(
            "the request body is not a JSON object: send one object, {\"field\": value, ...}"
                .to_owned(),
        );
    }
    let mut decoder = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut decoder).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            format!("the request body is not valid: {inner}")
        } else {
            format!("the request body's field {path} is not valid: {inner}")
        }
    })?;
    // Anything after the value (`{...}garbage`, a second value) makes the body wrong too.
    decoder
        .end()
        .map_err(|err| format!("the request body is not valid: {err}: send one JSON value"))?;
    Ok(value)
}

impl OwnerSpec {
    /// Checks the shape of what the spec names, before anything is looked up on the host:
    /// at most one of `cgroup`, `pid` and `container`; `netns` only beside `cgroup` or
    /// alone; a cgroup as an absolute path. `Err` is the message of the
    /// `invalid_port_request` answer.
    pub fn check(&self) -> Result<(), String> {
        let named = [
            self.cgroup.is_some(),
            self.pid.is_some(),
            self.container.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count();
        if named > 1 {
            return Err("give one of cgroup, pid and container, not several".to_owned());
        }
        if self.netns.is_some() && (self.pid.is_some() || self.container.is_some()) {
            return Err(
                "a process or a container names its own namespace: give netns only with cgroup, or alone"
                    .to_owned(),
            );
        }
        if let Some(path) = &self.cgroup
            && !path.is_absolute()
        {
            return Err(format!(
                "cgroup {} is not an absolute path: give the cgroup2 directory, e.g. /sys/fs/cgroup/my.slice",
                path.display()
            ));
        }
        Ok(())
    }

    /// Checks a spec that moves a port to a new owner (`PATCH /v1/ports/{port}/owner`)
    /// before [`OwnerSpec::check`]: it names the owner (a cgroup, a process or a
    /// container), and no namespace, since a port keeps its own. `Err` is the message of
    /// the `invalid_port_request` answer.
    pub fn check_new_owner(&self) -> Result<(), String> {
        if self.netns.is_some() {
            return Err(
                "a port keeps its namespace: name only its new owner (cgroup, pid or container)"
                    .to_owned(),
            );
        }
        if self.cgroup.is_none() && self.pid.is_none() && self.container.is_none() {
            return Err("name the new owner: cgroup, pid or container".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::decode_body;
    use crate::api::{AllocRequest, OwnerSpec};

    #[test]
    fn a_bad_body_is_answered_with_the_field_that_is_wrong() {
        let err = decode_body::<AllocRequest>(br#"{"owner":"web","port":70000}"#).unwrap_err();
        assert!(
            err.starts_with("the request body's field port is not valid"),
            "{err}"
        );
        let err = decode_body::<AllocRequest>(b"{").unwrap_err();
        assert!(err.contains("EOF while parsing"), "{err}");
        // One object and nothing else: not an array, not a second value, not trailing bytes.
        let err = decode_body::<AllocRequest>(b"[").unwrap_err();
        assert!(
            err.starts_with("the request body is not a JSON object"),
            "{err}"
        );
        for body in [&br#"{"owner":"a"}{"owner":"b"}"#[..], br#"{"owner":"a"} x"#] {
            let err = decode_body::<AllocRequest>(body).unwrap_err();
            assert!(err.ends_with("send one JSON value"), "{err}");
        }
        assert!(decode_body::<AllocRequest>(b" {\"owner\":\"a\"} \n").is_ok());
    }

    #[test]
    fn an_owner_is_named_once_and_a_new_owner_without_a_namespace() {
        let spec = |json: &str| decode_body::<OwnerSpec>(json.as_bytes()).unwrap();
        assert!(
            spec(r#"{"cgroup":"/sys/fs/cgroup/a","netns":"/run/netns/b"}"#)
                .check()
                .is_ok()
        );
        assert!(spec(r#"{"cgroup":"/a","pid":1}"#).check().is_err());
        assert!(spec(r#"{"pid":1,"netns":"/run/netns/b"}"#).check().is_err());
        assert!(spec(r#"{"cgroup":"relative"}"#).check().is_err());
        assert!(spec(r#"{"pid":1}"#).check_new_owner().is_ok());
        assert!(spec("{}").check_new_owner().is_err());
        assert!(
            spec(r#"{"cgroup":"/a","netns":"/b"}"#)
                .check_new_owner()
                .is_err()
        );
    }
}
