//! The OpenAPI 3.1 description of the API, generated from the handlers' annotations and
//! the models (`utoipa`), served at `GET /openapi.json` (no key needed).
//!
//! The control-plane paths are listed once, flat; [`Namespaced`] adds each again under
//! `/v1/namespaces/{namespace}` as the router serves them. Data-plane paths get the
//! sandbox header, and every path the bearer key.

use super::error::ErrorBody;
use super::model::*;
use super::{files, processes, sandboxes, snapshots};
use std::sync::OnceLock;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Object, Required, Type};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stasis",
        description = "WebAssembly sandboxes with snapshots, behind a Tensorlake-compatible API. \
                       Every request but this document needs `Authorization: Bearer KEY`."
    ),
    paths(
        sandboxes::create,
        sandboxes::list,
        sandboxes::get,
        sandboxes::update,
        sandboxes::delete,
        sandboxes::suspend,
        sandboxes::resume,
        snapshots::create,
        snapshots::list,
        snapshots::list_for_sandbox,
        snapshots::get,
        snapshots::delete,
        processes::start_process,
        processes::run_process,
        processes::list_processes,
        processes::get_process,
        processes::kill_process,
        processes::signal_process,
        processes::write_stdin,
        processes::close_stdin,
        processes::get_stdout,
        processes::get_stderr,
        processes::get_output,
        processes::follow_stdout,
        processes::follow_stderr,
        processes::follow_output,
        files::read_file,
        files::write_file,
        files::delete_file,
        files::list_directory,
        super::health,
        super::info,
    ),
    components(schemas(ErrorBody, ExitEvent, SnapshotType, SnapshotStatusName, SandboxStatusName)),
    modifiers(&Namespaced),
    tags(
        (name = "sandboxes", description = "Control plane: sandboxes"),
        (name = "snapshots", description = "Control plane: snapshots"),
        (name = "processes", description = "Data plane: processes of the sandbox named by `x-tensorlake-sandbox-id`"),
        (name = "files", description = "Data plane: files of the sandbox named by `x-tensorlake-sandbox-id`"),
        (name = "daemon", description = "Data plane: the sandbox daemon"),
    )
)]
pub struct ApiDoc;

struct Namespaced;

fn string_param(name: &str, location: ParameterIn, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(location)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(Object::with_type(Type::String)))
        .build()
}

impl Modify for Namespaced {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("API key").build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
        let paths = &mut openapi.paths.paths;
        for item in paths.values_mut() {
            // Handler names repeat across modules (`create`, `get`): prefix the tag, so
            // that every operation id is unique.
            for op in operations(item) {
                let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
                if let (Some(tag), Some(id)) = (tag, op.operation_id.as_mut()) {
                    *id = format!("{tag}_{id}");
                }
            }
        }
        for (path, item) in paths.iter_mut() {
            if path.starts_with("/api/v1/") {
                for op in operations(item) {
                    op.parameters.get_or_insert_with(Vec::new).insert(
                        0,
                        string_param(
                            "x-tensorlake-sandbox-id",
                            ParameterIn::Header,
                            "The sandbox (id or name); or send `Host: <id>.local`",
                        ),
                    );
                }
            }
        }
        let control: Vec<_> = paths
            .iter()
            .filter(|(path, _)| path.starts_with("/sandboxes") || path.starts_with("/snapshots"))
            .map(|(path, item)| (path.clone(), item.clone()))
            .collect();
        for (path, mut item) in control {
            for op in operations(&mut item) {
                op.operation_id = op.operation_id.take().map(|id| format!("{id}_namespaced"));
                op.parameters
                    .get_or_insert_with(Vec::new)
                    .insert(0, string_param("namespace", ParameterIn::Path, "The API key's namespace (another: 403)"));
                op.responses.responses.insert(
                    "403".into(),
                    utoipa::openapi::ResponseBuilder::new()
                        .description("The key is not valid for this namespace")
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new()
                                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build()
                        .into(),
                );
            }
            paths.insert(format!("/v1/namespaces/{{namespace}}{path}"), item);
        }
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
}

/// The document, rendered once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_with_the_snapshot_endpoint() {
        let doc: serde_json::Value = serde_json::from_str(super::json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let op = &doc["paths"]["/sandboxes/{sandbox_id}/snapshot"]["post"];
        assert!(op["responses"]["202"].is_object(), "{op}");
        assert!(doc["paths"]["/v1/namespaces/{namespace}/sandboxes/{sandbox_id}/snapshot"]["post"].is_object());
        assert!(doc["paths"]["/sandboxes/{sandbox_id}"]["patch"].is_object());
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
                assert!(ids.insert(id.to_string()), "operationId {id} repeats ({method} {path})");
            }
        }
        let ty = &doc["components"]["schemas"]["SnapshotType"];
        assert_eq!(ty["enum"], serde_json::json!(["memory", "filesystem"]), "{ty}");
    }
}
