//! The Confluent-compatible REST surface over a [`Store`].
//!
//! Only what Avro producers, consumers and schema tooling actually call is served. Two client
//! quirks shape this module:
//!
//! * Clients label request bodies `application/vnd.schemaregistry.v1+json`,
//!   `application/vnd.schemaregistry+json`, `application/json` or nothing at all, so bodies are
//!   read as raw bytes and parsed as JSON here instead of through axum's `Json` extractor, which
//!   insists on `application/json`.
//! * Clients branch on `error_code`, so every error — including unknown routes and malformed
//!   bodies — is answered with Confluent's `{"error_code": N, "message": "..."}` body.
//!
//! Store mutations may fsync, so they run on the blocking pool rather than on a runtime worker.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::compatibility::CompatibilityLevel;
use super::error::{status_of, RegistryError};
use super::schema::ParsedSchema;
use super::store::{Store, SubjectVersion, VersionSelector};

/// Content type of every response, as Confluent sends it.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type Shared = State<Arc<Store>>;
type Params = Query<HashMap<String, String>>;
type Reply = Result<Response, RegistryError>;

/// Builds the router; see the module docs for what is served.
pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_id))
        .route("/schemas/ids/{id}/versions", get(versions_of_id))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_against_subject),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_against_version),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(store)
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let code = self.error_code();
        if code >= 50000 {
            tracing::error!(error = %self, "schema registry request failed");
        } else {
            tracing::debug!(error = %self, code, "schema registry request rejected");
        }
        error_response(code, &self.to_string())
    }
}

fn error_response(code: u32, message: &str) -> Response {
    let status = StatusCode::from_u16(status_of(code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(status, &json!({ "error_code": code, "message": message }))
}

fn reply(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn ok(body: Value) -> Reply {
    Ok(reply(StatusCode::OK, &body))
}

/// Whether query flag `name` is `true` (case-insensitive); absent or anything else is false.
fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(body)
        .map_err(|err| RegistryError::BadRequest(format!("Invalid request body: {err}")))
}

fn parse_id(id: &str) -> Result<u32, RegistryError> {
    id.parse().map_err(|_| RegistryError::SchemaNotFound)
}

/// Runs a store mutation on the blocking pool (it may write and fsync the state file).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| RegistryError::Storage(format!("store task failed: {err}")))?
}

/// Body of register, lookup and compatibility requests.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Option<Vec<Value>>,
}

impl SchemaRequest {
    fn parse(body: &[u8]) -> Result<ParsedSchema, RegistryError> {
        let request: Self = parse_body(body)?;
        ParsedSchema::parse(
            request.schema.as_deref().unwrap_or_default(),
            request.schema_type.as_deref(),
            request.references.as_ref().map_or(0, Vec::len),
        )
    }
}

/// Body of `PUT /config[/{subject}]`.
#[derive(Deserialize)]
struct ConfigRequest {
    #[serde(default, alias = "compatibilityLevel")]
    compatibility: Option<String>,
}

impl ConfigRequest {
    fn parse(body: &[u8]) -> Result<CompatibilityLevel, RegistryError> {
        let request: Self = parse_body(body)?;
        request
            .compatibility
            .ok_or(RegistryError::InvalidCompatibilityLevel)?
            .parse()
    }
}

fn version_json(found: &SubjectVersion) -> Value {
    json!({
        "subject": found.subject,
        "version": found.version,
        "id": found.id,
        "schema": found.schema,
    })
}

/// A raw schema text as a response body (it is itself JSON).
fn raw_schema(schema: String) -> Reply {
    let mut response = (StatusCode::OK, schema).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(response)
}

async fn root() -> Reply {
    ok(json!({}))
}

async fn schema_types() -> Reply {
    ok(json!([super::schema::AVRO]))
}

async fn not_found() -> Response {
    error_response(404, "HTTP 404 Not Found")
}

async fn method_not_allowed() -> Response {
    error_response(405, "HTTP 405 Method Not Allowed")
}

/// `GET /schemas/ids/{id}`; `schemaType` is omitted because it is always AVRO (as Confluent
/// omits it for AVRO).
async fn schema_by_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    ok(json!({ "schema": store.schema_by_id(parse_id(&id)?)? }))
}

async fn raw_schema_by_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    raw_schema(store.schema_by_id(parse_id(&id)?)?)
}

async fn subjects_of_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    let mut subjects: Vec<String> = store
        .versions_of_id(parse_id(&id)?)?
        .into_iter()
        .map(|(subject, _)| subject)
        .collect();
    subjects.dedup();
    ok(json!(subjects))
}

async fn versions_of_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    let versions: Vec<Value> = store
        .versions_of_id(parse_id(&id)?)?
        .into_iter()
        .map(|(subject, version)| json!({ "subject": subject, "version": version }))
        .collect();
    ok(json!(versions))
}

async fn list_subjects(State(store): Shared, Query(params): Params) -> Reply {
    ok(json!(store.subjects(flag(&params, "deleted"))))
}

async fn list_versions(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(params): Params,
) -> Reply {
    ok(json!(store.versions(&subject, flag(&params, "deleted"))?))
}

async fn register(State(store): Shared, Path(subject): Path<String>, body: Bytes) -> Reply {
    let schema = SchemaRequest::parse(&body)?;
    let id = blocking(move || store.register(&subject, &schema)).await?;
    ok(json!({ "id": id }))
}

async fn lookup(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> Reply {
    let schema = SchemaRequest::parse(&body)?;
    let found = store.lookup(&subject, &schema, flag(&params, "deleted"))?;
    ok(version_json(&found))
}

async fn delete_subject(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(params): Params,
) -> Reply {
    let permanent = flag(&params, "permanent");
    let versions = blocking(move || store.delete_subject(&subject, permanent)).await?;
    ok(json!(versions))
}

async fn get_version(
    State(store): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(params): Params,
) -> Reply {
    let selector: VersionSelector = version.parse()?;
    let found = store.version(&subject, selector, flag(&params, "deleted"))?;
    ok(version_json(&found))
}

async fn get_version_schema(
    State(store): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(params): Params,
) -> Reply {
    let selector: VersionSelector = version.parse()?;
    raw_schema(
        store
            .version(&subject, selector, flag(&params, "deleted"))?
            .schema,
    )
}

fn compatibility_reply(problems: Vec<String>, verbose: bool) -> Reply {
    let is_compatible = problems.is_empty();
    if verbose {
        ok(json!({ "is_compatible": is_compatible, "messages": problems }))
    } else {
        ok(json!({ "is_compatible": is_compatible }))
    }
}

async fn check_against_subject(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> Reply {
    let schema = SchemaRequest::parse(&body)?;
    let problems = store.check_compatibility(&subject, &schema, None)?;
    compatibility_reply(problems, flag(&params, "verbose"))
}

async fn check_against_version(
    State(store): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> Reply {
    let selector: VersionSelector = version.parse()?;
    let schema = SchemaRequest::parse(&body)?;
    let problems = store.check_compatibility(&subject, &schema, Some(selector))?;
    compatibility_reply(problems, flag(&params, "verbose"))
}

async fn get_global_config(State(store): Shared) -> Reply {
    ok(json!({ "compatibilityLevel": store.global_level() }))
}

async fn put_global_config(State(store): Shared, body: Bytes) -> Reply {
    let level = ConfigRequest::parse(&body)?;
    blocking(move || store.set_global_level(level)).await?;
    ok(json!({ "compatibility": level }))
}

async fn get_subject_config(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(params): Params,
) -> Reply {
    let level = if flag(&params, "defaultToGlobal") {
        store.effective_level(&subject)
    } else {
        store.subject_level(&subject).ok_or(
            RegistryError::SubjectLevelCompatibilityNotConfigured(subject),
        )?
    };
    ok(json!({ "compatibilityLevel": level }))
}

async fn put_subject_config(
    State(store): Shared,
    Path(subject): Path<String>,
    body: Bytes,
) -> Reply {
    let level = ConfigRequest::parse(&body)?;
    blocking(move || store.set_subject_level(&subject, level)).await?;
    ok(json!({ "compatibility": level }))
}

async fn delete_subject_config(State(store): Shared, Path(subject): Path<String>) -> Reply {
    let previous = blocking(move || store.delete_subject_level(&subject)).await?;
    ok(json!({ "compatibilityLevel": previous }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_case_insensitive_and_default_false() {
        let mut params = HashMap::new();
        params.insert("verbose".to_owned(), "TRUE".to_owned());
        params.insert("deleted".to_owned(), "false".to_owned());
        assert!(flag(&params, "verbose"));
        assert!(!flag(&params, "deleted"));
        assert!(!flag(&params, "permanent"));
    }

    #[test]
    fn schema_request_tolerates_missing_optional_fields() {
        let parsed = SchemaRequest::parse(br#"{"schema":"\"string\""}"#).unwrap();
        assert_eq!(parsed.raw, "\"string\"");
        let err = SchemaRequest::parse(br#"{"schemaType":"AVRO"}"#).unwrap_err();
        assert_eq!(err.error_code(), 42201);
        let err = SchemaRequest::parse(b"not json").unwrap_err();
        assert_eq!(err.error_code(), 400);
        let err = SchemaRequest::parse(br#"{"schema":"\"string\"","schemaType":"PROTOBUF"}"#)
            .unwrap_err();
        assert_eq!(err.error_code(), 42201);
    }

    #[test]
    fn config_request_accepts_both_field_names() {
        assert_eq!(
            ConfigRequest::parse(br#"{"compatibility":"full"}"#).unwrap(),
            CompatibilityLevel::Full
        );
        assert_eq!(
            ConfigRequest::parse(br#"{"compatibilityLevel":"NONE"}"#).unwrap(),
            CompatibilityLevel::None
        );
        assert_eq!(
            ConfigRequest::parse(br#"{"compatibility":"SIDEWAYS"}"#)
                .unwrap_err()
                .error_code(),
            42203
        );
        assert_eq!(ConfigRequest::parse(b"{}").unwrap_err().error_code(), 42203);
    }
}
