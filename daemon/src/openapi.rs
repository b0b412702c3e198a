//! The REST API's OpenAPI document, generated: the paths and schemas come
//! from the handlers' `#[utoipa::path]` annotations and the types'
//! `ToSchema` derives (the same handler lists build the routers:
//! [`crate::api`], [`crate::auth`]); this module adds what no handler or
//! type says. The daemon serves it at `/v1/openapi.json`;
//! `daemon/openapi.json` is its committed copy, which the web UI's build
//! turns into TypeScript types (a test fails when the copy is stale).

use utoipa::OpenApi as _;

/// The document's frame: what no handler or type says.
#[derive(utoipa::OpenApi)]
#[openapi(info(
    title = "vireo daemon API",
    description = "The REST API of `vireo serve`: JSON over HTTP/1.1 on a Unix socket and, with `--listen tcp:HOST:PORT`, over TLS. Unix-socket clients act as admin; TLS clients authenticate with `Authorization: Bearer TOKEN` (`?access_token=TOKEN` counts only on the console WebSocket and the event stream) and get 401 without a valid token, 429 (with Retry-After) for a minute after 10 invalid tokens from their address within a minute, 403 when the token's role is too low (viewer: reads; operator: also start/stop/kill/pause/resume/reboot/balloon, take and restore snapshots; admin: also create/update/delete VMs, delete snapshots, clone and migrate VMs, and tokens). `GET /v1/openapi.json` needs no token. Every error is `{\"error\": {\"code\", \"message\"}}` with a 4xx status for anything the client can fix and 5xx only for the daemon's own failures."
))]
struct Frame;

/// The OpenAPI document: the API's routes and the token routes
/// ([`crate::auth`]), with what every operation shares.
fn openapi_document() -> utoipa::openapi::OpenApi {
    let (_, routes) = crate::api::routes().split_for_parts();
    let mut doc = Frame::openapi().merge_from(routes);
    doc.merge(crate::auth::openapi());
    shared::complete(&mut doc);
    doc
}

/// [`openapi_document`] as the JSON the daemon serves (and
/// `daemon/openapi.json` holds), built once.
pub fn openapi_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut json = openapi_document()
            .to_pretty_json()
            .expect("the OpenAPI document serializes");
        json.push('\n');
        json
    })
}

/// What every operation shares, which the per-handler annotations leave out.
mod shared {
    use utoipa::openapi::path::{Operation, Parameter, ParameterIn};
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
    use utoipa::openapi::security::{
        ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{Content, OpenApi, Ref, RefOr};

    /// Add the named string schemas, the authentication schemes and their
    /// 401/403 answers to every operation that needs a token, and the
    /// path and query parameters' schemas.
    pub fn complete(doc: &mut OpenApi) {
        doc.info.version = crate::version::API_VERSION.into();
        let components = doc.components.get_or_insert_with(Default::default);
        components.schemas.extend(
            vireo_api::model::schema::components()
                .into_iter()
                .map(|(n, s)| (n.into(), s)),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `vireo token create` (`vireo_<id>_<secret>`). Needed on TLS connections; Unix-socket clients need none. Host paths in a definition (disks, kernel, initrd, image) must lie beneath one of the daemon's storage directories (`vireo serve --storage`), else 400 path_not_allowed.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "accessToken",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The same token in the query string, for clients that cannot set headers: accepted only on `GET /v1/vms/{name}/console/ws` and `GET /v1/events`, ignored elsewhere.",
            ))),
        );
        let error = || Content::new(Some(Ref::from_schema_name("Error")));
        components.responses.insert(
            "Unauthorized".into(),
            ResponseBuilder::new()
                .description("No token, or a token that is malformed, unknown or revoked (code unauthorized; TLS connections only).")
                .header(
                    "WWW-Authenticate",
                    utoipa::openapi::header::HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::String))
                        .description(Some("`Bearer realm=\"vireo\"`"))
                        .build(),
                )
                .content("application/json", error())
                .build()
                .into(),
        );
        components.responses.insert(
            "Forbidden".into(),
            ResponseBuilder::new()
                .description("The token's role is too low for this request (code forbidden); the message names both roles.")
                .content("application/json", error())
                .build()
                .into(),
        );
        // Every body is exactly its Rust type's fields: requests deny
        // unknown fields, responses are serialized structs.
        for schema in components.schemas.values_mut() {
            if let RefOr::T(Schema::Object(o)) = schema {
                if o.schema_type == Type::Object.into() && o.additional_properties.is_none() {
                    o.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
                }
            }
        }
        doc.security = Some(vec![
            SecurityRequirement::new::<_, _, String>("bearer", []),
            SecurityRequirement::new::<_, _, String>("accessToken", []),
        ]);
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                complete_operation(path, op);
            }
        }
    }

    fn complete_operation(path: &str, op: &mut Operation) {
        if path == "/v1/openapi.json" {
            // Public: an empty list overrides the document's security.
            op.security = Some(Vec::new());
        } else {
            for (status, name) in [("401", "Unauthorized"), ("403", "Forbidden")] {
                op.responses
                    .responses
                    .insert(status.into(), RefOr::Ref(Ref::from_response_name(name)));
            }
        }
        // An optional body (`Option<T>` in the annotation) is absent or a
        // T, never `null`.
        if let Some(body) = &mut op.request_body {
            for content in body.content.values_mut() {
                if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema {
                    if let [null, RefOr::Ref(t)] = one_of.items.as_slice() {
                        if is_null(null) {
                            content.schema = Some(RefOr::Ref(t.clone()));
                        }
                    }
                }
            }
        }
        for p in op.parameters.iter_mut().flatten() {
            if let Some(schema) = parameter_schema(p) {
                p.schema = Some(schema);
            }
        }
    }

    fn is_null(schema: &RefOr<Schema>) -> bool {
        matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == Type::Null.into())
    }

    /// The schemas of the parameters whose Rust type is a plain string.
    fn parameter_schema(p: &Parameter) -> Option<RefOr<Schema>> {
        let named = |n: &str| Some(RefOr::Ref(Ref::from_schema_name(n)));
        match (&p.parameter_in, p.name.as_str()) {
            (ParameterIn::Path, "name") | (ParameterIn::Query, "vm") => named("VmName"),
            (ParameterIn::Path, "tag") => named("SnapshotTag"),
            (ParameterIn::Query, "console") => Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["0", "1", "true", "false"]))
                    .into(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed copy (`daemon/openapi.json`, which the web UI's build
    /// reads) is the generated document; `VIREO_UPDATE_OPENAPI=1` rewrites it.
    #[test]
    fn the_committed_openapi_json_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        if std::env::var_os("VIREO_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, openapi_json()).expect("writing daemon/openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == openapi_json(),
            "daemon/openapi.json is stale: run `VIREO_UPDATE_OPENAPI=1 cargo test -p vireo-daemon --lib openapi_json`, then scripts/build-web, and commit both"
        );
    }

    /// The router and the document come from the same handler list; this
    /// checks what `shared::complete` adds: the token routes, and the
    /// authentication answers on every operation but the document's own.
    #[test]
    fn openapi_document_covers_the_token_routes_and_authentication() {
        let doc: serde_json::Value = serde_json::from_str(openapi_json()).expect("parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/v1/whoami",
            "/v1/tokens",
            "/v1/tokens/{id}",
            "/v1/vms/{name}/console/ws",
        ] {
            assert!(paths.contains_key(p), "{p} is not documented");
        }
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let public = op["security"] == serde_json::json!([]);
                assert_eq!(public, path == "/v1/openapi.json", "{method} {path}");
                let responses = op["responses"].as_object().unwrap();
                for status in ["401", "403"] {
                    assert_eq!(responses.contains_key(status), !public, "{method} {path}");
                }
            }
        }
    }
}
