//! `/v1/keys`: client keys for the knock (administrators only). A new key's secret is
//! answered once, as the key file its client keeps; it is never shown again.

use axum::{extract::Path as UrlPath, http::StatusCode, response::Response};

use super::{
    ApiError, Caller, json_body,
    openapi::{Busy, Failed, Forbidden, TooLarge, examples},
};
use crate::{
    api::{ErrorBody, KeyCreated, KeyPort, KeyRequestBody, KeyView},
    daemon::audit::AuditParams,
    knock::{self, KeyFile},
    manager::keys::KeyRequest,
    model::{ClientKey, PortId},
};

type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// Makes a client key; its key file is answered this once.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "security",
    operation_id = "key_add",
    request_body(content = KeyRequestBody, example = examples::key_request),
    responses(
        (status = 201, description = "The key and its key file", body = KeyCreated, example = examples::key_created),
        (status = 400, description = "The request is wrong (`bad_json`, `invalid_port_request`: a bad name, or a key of that name exists)", body = ErrorBody),
        Forbidden, TooLarge, Failed, Busy,
    ),
)]
pub(super) async fn add(caller: Caller, body: Body) -> Response {
    caller
        .answer("key_add", StatusCode::CREATED, async |audit| {
            let request: KeyRequestBody = json_body(body)?;
            audit.key = Some(request.name.clone());
            audit.params.ttl = Some(AuditParams::duration(request.max_ttl));
            audit.params.any_source = Some(request.any_source);
            let key = caller
                .app
                .manager
                .add_key(
                    KeyRequest {
                        name: request.name,
                        ports: request
                            .ports
                            .iter()
                            .map(|port| PortId::new(port.port, port.proto))
                            .collect(),
                        max_ttl: request.max_ttl,
                        any_source: request.any_source,
                    },
                    caller.actor()?,
                )
                .await?;
            let key_file = KeyFile {
                name: key.name.clone(),
                key: knock::Key(key.secret),
                any_source: key.any_source,
            }
            .to_text();
            Ok(KeyCreated {
                key: view(&key),
                key_file,
            })
        })
        .await
}

/// Every client key (never their secrets).
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "security",
    operation_id = "key_list",
    responses(
        (status = 200, description = "The keys", body = Vec<KeyView>, example = examples::keys),
        Forbidden, Busy,
    ),
)]
pub(super) async fn list(caller: Caller) -> Response {
    caller
        .answer("key_list", StatusCode::OK, async |_| {
            if caller.actor()? != crate::manager::Actor::Admin {
                return Err(ApiError::Port(crate::manager::PortError::AccessDenied(
                    "only an administrator may list keys".to_owned(),
                )));
            }
            Ok(caller
                .app
                .manager
                .keys()
                .await
                .iter()
                .map(view)
                .collect::<Vec<_>>())
        })
        .await
}

/// Revokes a client key.
#[utoipa::path(
    delete,
    path = "/v1/keys/{name}",
    tag = "security",
    operation_id = "key_revoke",
    params(
        ("name" = String, Path, description = "The key's name"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "No key has that name (`invalid_port_request`)", body = ErrorBody),
        Forbidden, Failed, Busy,
    ),
)]
pub(super) async fn revoke(caller: Caller, UrlPath(name): UrlPath<String>) -> Response {
    caller
        .answer("key_revoke", StatusCode::NO_CONTENT, async |audit| {
            audit.key = Some(name.clone());
            Ok(caller
                .app
                .manager
                .revoke_key(&name, caller.actor()?)
                .await?)
        })
        .await
}

/// A key as the API shows it.
fn view(key: &ClientKey) -> KeyView {
    KeyView {
        name: key.name.clone(),
        ports: key
            .ports
            .iter()
            .map(|id| KeyPort {
                port: id.port,
                proto: id.protocol,
            })
            .collect(),
        max_ttl: key.max_ttl,
        any_source: key.any_source,
        created_at: key.created_at,
    }
}
