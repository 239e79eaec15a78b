//! End-to-end tests of the schema registry over real HTTP: `serve` runs in-process on an
//! ephemeral port with a temporary data directory, and reqwest plays the Confluent client.

use std::path::{Path, PathBuf};

use blindstrader_registry::{serve, CONTENT_TYPE};
use reqwest::header;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SUBJECT: &str = "blindstrader.organisations-blindstrader.tenancy.OrganisationCreated";

fn organisation_created(extra_fields: &str) -> String {
    format!(
        r#"{{"type":"record","name":"OrganisationCreated","namespace":"blindstrader.tenancy","fields":[{{"name":"organisation_id","type":"string"}}{extra_fields}]}}"#
    )
}

fn v1() -> String {
    organisation_created("")
}

/// v1 plus a field with a default: backward compatible.
fn v2() -> String {
    organisation_created(r#",{"name":"name","type":"string","default":""}"#)
}

/// v2 plus a field without a default: not backward compatible.
fn incompatible() -> String {
    organisation_created(
        r#",{"name":"name","type":"string","default":""},{"name":"plan","type":"string"}"#,
    )
}

struct Registry {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Registry {
    async fn start(data_dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, PathBuf::from(data_dir), shutdown.clone()));
        Self {
            base,
            client: reqwest::Client::new(),
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .expect("server stops after cancellation")
            .expect("server task does not panic")
            .expect("server exits cleanly");
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(content_type.as_deref(), Some(CONTENT_TYPE));
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("response {text:?} is not JSON: {err}"));
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    /// POST/PUT with a JSON body labelled the way Confluent clients label it.
    async fn send_json(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.client
                .request(method, format!("{}{path}", self.base))
                .header(header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_string()),
        )
        .await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Value) {
        self.post(
            &format!("/subjects/{subject}/versions"),
            &json!({ "schema": schema }),
        )
        .await
    }
}

fn assert_error(response: &(u16, Value), status: u16, code: u64) {
    assert_eq!(response.0, status, "{response:?}");
    assert_eq!(response.1["error_code"], json!(code), "{response:?}");
    assert!(
        response.1["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{response:?}"
    );
}

#[tokio::test]
async fn register_is_idempotent_and_ids_are_global() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    let (status, body) = registry.register(SUBJECT, &v1()).await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_u64().expect("numeric id");
    assert!(id >= 1);

    // Same schema, reformatted: same id, no new version.
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v1()).unwrap()).unwrap();
    assert_ne!(reformatted, v1());
    let (status, body) = registry.register(SUBJECT, &reformatted).await;
    assert_eq!((status, body["id"].as_u64()), (200, Some(id)));
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1]))
    );

    // Same schema under another subject: same global id, version 1 there.
    let other = "blindstrader.other-value";
    let (status, body) = registry.register(other, &v1()).await;
    assert_eq!((status, body["id"].as_u64()), (200, Some(id)));
    assert_eq!(
        registry.get(&format!("/subjects/{other}/versions")).await,
        (200, json!([1]))
    );

    let (status, subjects) = registry.get("/subjects").await;
    assert_eq!(status, 200);
    assert_eq!(subjects, json!([SUBJECT, other]), "sorted by name");

    let (status, versions) = registry.get(&format!("/schemas/ids/{id}/versions")).await;
    assert_eq!(status, 200);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.contains(&json!({"subject": SUBJECT, "version": 1})));

    registry.stop().await;
}

#[tokio::test]
async fn evolution_is_checked_against_the_compatibility_level() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    let first = registry.register(SUBJECT, &v1()).await.1["id"]
        .as_u64()
        .unwrap();

    // Adding a field with a default is backward compatible: new version, new id.
    let (status, body) = registry.register(SUBJECT, &v2()).await;
    assert_eq!(status, 200, "{body}");
    let second = body["id"].as_u64().unwrap();
    assert_ne!(second, first);
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1, 2]))
    );

    // Adding a field without a default is not.
    let rejected = registry.register(SUBJECT, &incompatible()).await;
    assert_error(&rejected, 409, 409);
    let message = rejected.1["message"].as_str().unwrap();
    assert!(
        message.starts_with("Schema being registered is incompatible with an earlier schema"),
        "{message}"
    );
    assert!(message.contains(SUBJECT), "{message}");
    assert!(message.contains("plan"), "{message}");
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1, 2]))
    );

    // Unparseable and non-Avro schemas.
    let invalid = registry
        .register(SUBJECT, r#"{"type":"record","name":"Broken"}"#)
        .await;
    assert_error(&invalid, 422, 42201);
    assert!(invalid.1["message"]
        .as_str()
        .unwrap()
        .starts_with("Invalid schema"));
    assert_error(&registry.register(SUBJECT, "{not json").await, 422, 42201);
    let protobuf = registry
        .post(
            &format!("/subjects/{SUBJECT}/versions"),
            &json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
        )
        .await;
    assert_error(&protobuf, 422, 42201);

    // After NONE, the incompatible schema goes in.
    let (status, body) = registry
        .put(
            &format!("/config/{SUBJECT}"),
            &json!({"compatibility": "NONE"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"compatibility": "NONE"})));
    let (status, body) = registry.register(SUBJECT, &incompatible()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1, 2, 3]))
    );

    registry.stop().await;
}

#[tokio::test]
async fn lookup_fetch_by_id_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;
    let first = registry.register(SUBJECT, &v1()).await.1["id"]
        .as_u64()
        .unwrap();
    let second = registry.register(SUBJECT, &v2()).await.1["id"]
        .as_u64()
        .unwrap();

    // Lookup finds the version holding the schema.
    let (status, body) = registry
        .post(
            &format!("/subjects/{SUBJECT}?deleted=false"),
            &json!({"schema": v1()}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"subject": SUBJECT, "id": first, "version": 1, "schema": v1()})
    );
    assert_error(
        &registry
            .post(
                &format!("/subjects/{SUBJECT}"),
                &json!({"schema": incompatible()}),
            )
            .await,
        404,
        40403,
    );
    assert_error(
        &registry
            .post("/subjects/nobody-value", &json!({"schema": v1()}))
            .await,
        404,
        40401,
    );

    // Fetch by id; schemaType is omitted for Avro.
    assert_eq!(
        registry
            .get(&format!("/schemas/ids/{second}?deleted=true"))
            .await,
        (200, json!({"schema": v2()}))
    );
    assert_error(&registry.get("/schemas/ids/9999").await, 404, 40403);

    // Versions by number, latest and -1.
    for version in ["latest", "-1", "2"] {
        assert_eq!(
            registry
                .get(&format!("/subjects/{SUBJECT}/versions/{version}"))
                .await,
            (
                200,
                json!({"subject": SUBJECT, "version": 2, "id": second, "schema": v2()})
            ),
            "version {version}"
        );
    }
    let (status, body) = registry
        .get(&format!("/subjects/{SUBJECT}/versions/1"))
        .await;
    assert_eq!((status, body["id"].as_u64()), (200, Some(first)));
    assert_error(
        &registry
            .get(&format!("/subjects/{SUBJECT}/versions/7"))
            .await,
        404,
        40402,
    );
    assert_error(
        &registry
            .get(&format!("/subjects/{SUBJECT}/versions/banana"))
            .await,
        422,
        42202,
    );

    // The raw schema of a version is the schema JSON itself.
    let (status, raw) = registry
        .get(&format!("/subjects/{SUBJECT}/versions/latest/schema"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(raw, serde_json::from_str::<Value>(&v2()).unwrap());

    registry.stop().await;
}

#[tokio::test]
async fn compatibility_endpoint_reports_without_registering() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    // Unknown subject: anything is compatible with nothing; a specific version is 40401.
    let (status, body) = registry
        .post(
            "/compatibility/subjects/nobody-value/versions",
            &json!({"schema": v1()}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"is_compatible": true})));
    assert_error(
        &registry
            .post(
                "/compatibility/subjects/nobody-value/versions/latest",
                &json!({"schema": v1()}),
            )
            .await,
        404,
        40401,
    );

    registry.register(SUBJECT, &v1()).await;
    let path = format!("/compatibility/subjects/{SUBJECT}/versions");
    assert_eq!(
        registry.post(&path, &json!({"schema": v2()})).await,
        (200, json!({"is_compatible": true}))
    );
    let without_default = organisation_created(r#",{"name":"plan","type":"string"}"#);
    assert_eq!(
        registry
            .post(
                &format!("{path}/latest"),
                &json!({"schema": without_default})
            )
            .await,
        (200, json!({"is_compatible": false}))
    );
    let (status, body) = registry
        .post(
            &format!("{path}/1?verbose=true"),
            &json!({"schema": without_default}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["is_compatible"], json!(false));
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0].as_str().unwrap().contains("plan"),
        "{messages:?}"
    );
    assert_error(
        &registry
            .post(&format!("{path}/5"), &json!({"schema": v2()}))
            .await,
        404,
        40402,
    );
    assert_error(
        &registry.post(&path, &json!({"schema": "{oops"})).await,
        422,
        42201,
    );

    // Checking registered nothing.
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1]))
    );

    registry.stop().await;
}

#[tokio::test]
async fn config_can_be_read_and_changed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    assert_eq!(
        registry.get("/config").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        registry
            .put("/config", &json!({"compatibility": "FULL"}))
            .await,
        (200, json!({"compatibility": "FULL"}))
    );
    assert_eq!(
        registry.get("/config").await,
        (200, json!({"compatibilityLevel": "FULL"}))
    );
    assert_error(
        &registry
            .put("/config", &json!({"compatibility": "SIDEWAYS"}))
            .await,
        422,
        42203,
    );

    let subject_config = format!("/config/{SUBJECT}");
    assert_error(&registry.get(&subject_config).await, 404, 40408);
    assert_eq!(
        registry
            .get(&format!("{subject_config}?defaultToGlobal=true"))
            .await,
        (200, json!({"compatibilityLevel": "FULL"}))
    );
    assert_eq!(
        registry
            .put(
                &subject_config,
                &json!({"compatibility": "FORWARD_TRANSITIVE"})
            )
            .await,
        (200, json!({"compatibility": "FORWARD_TRANSITIVE"}))
    );
    assert_eq!(
        registry.get(&subject_config).await,
        (200, json!({"compatibilityLevel": "FORWARD_TRANSITIVE"}))
    );
    // The global level is untouched by the subject-level change.
    assert_eq!(
        registry.get("/config").await,
        (200, json!({"compatibilityLevel": "FULL"}))
    );

    // The level is enforced: under FULL, a field without default fails even though FORWARD
    // alone would accept it.
    registry
        .put(&subject_config, &json!({"compatibility": "FULL"}))
        .await;
    registry.register(SUBJECT, &v1()).await;
    let without_default = organisation_created(r#",{"name":"plan","type":"string"}"#);
    assert_error(
        &registry.register(SUBJECT, &without_default).await,
        409,
        409,
    );
    registry
        .put(&subject_config, &json!({"compatibility": "FORWARD"}))
        .await;
    assert_eq!(registry.register(SUBJECT, &without_default).await.0, 200);

    registry.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;
    let first = registry.register(SUBJECT, &v1()).await.1["id"]
        .as_u64()
        .unwrap();
    let second = registry.register(SUBJECT, &v2()).await.1["id"]
        .as_u64()
        .unwrap();
    registry
        .put("/config", &json!({"compatibility": "FULL_TRANSITIVE"}))
        .await;
    registry.stop().await;

    let registry = Registry::start(dir.path()).await;
    assert_eq!(registry.get("/subjects").await, (200, json!([SUBJECT])));
    assert_eq!(
        registry.get(&format!("/subjects/{SUBJECT}/versions")).await,
        (200, json!([1, 2]))
    );
    assert_eq!(
        registry.get(&format!("/schemas/ids/{first}")).await,
        (200, json!({"schema": v1()}))
    );
    assert_eq!(
        registry.get(&format!("/schemas/ids/{second}")).await,
        (200, json!({"schema": v2()}))
    );
    assert_eq!(
        registry.get("/config").await,
        (200, json!({"compatibilityLevel": "FULL_TRANSITIVE"}))
    );
    // Re-registering still deduplicates, and new ids continue after the old ones.
    assert_eq!(
        registry.register(SUBJECT, &v1()).await,
        (200, json!({"id": first}))
    );
    let (status, body) = registry
        .register(
            "another-value",
            &organisation_created(r#",{"name":"x","type":"int"}"#),
        )
        .await;
    assert_eq!(status, 200);
    assert!(body["id"].as_u64().unwrap() > second, "{body}");
    registry.stop().await;
}

#[tokio::test]
async fn unknown_things_are_404_with_confluent_codes() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    assert_eq!(registry.get("/subjects").await, (200, json!([])));
    assert_error(
        &registry.get("/subjects/nobody-value/versions").await,
        404,
        40401,
    );
    assert_error(
        &registry.get("/subjects/nobody-value/versions/latest").await,
        404,
        40401,
    );
    assert_error(&registry.get("/schemas/ids/1").await, 404, 40403);
    assert_error(&registry.get("/no/such/route").await, 404, 404);

    registry.stop().await;
}

#[tokio::test]
async fn bodies_are_accepted_whatever_their_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;
    let url = format!("{}/subjects/{SUBJECT}/versions", registry.base);
    let body = json!({"schema": v1(), "schemaType": "AVRO", "references": []}).to_string();

    let mut ids = Vec::new();
    for content_type in [
        Some("application/vnd.schemaregistry.v1+json"),
        Some("application/vnd.schemaregistry+json"),
        Some("application/json"),
        Some("application/octet-stream"),
        None,
    ] {
        let mut request = registry.client.post(&url).body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let (status, response) = registry.send(request).await;
        assert_eq!(status, 200, "{content_type:?}: {response}");
        ids.push(response["id"].as_u64().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");

    // Malformed JSON is a Confluent-style error too, not axum's plain-text rejection.
    let (status, response) = registry.send(registry.client.post(&url).body("{")).await;
    assert_eq!(status, 400);
    assert_eq!(response["error_code"], json!(400));

    registry.stop().await;
}

#[tokio::test]
async fn url_encoded_subjects_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;

    let (status, body) = registry.register("team%2Forders-value", &v1()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        registry.get("/subjects").await,
        (200, json!(["team/orders-value"]))
    );
    let (status, body) = registry
        .get("/subjects/team%2Forders-value/versions/latest")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], json!("team/orders-value"));

    registry.stop().await;
}

#[tokio::test]
async fn soft_and_permanent_subject_delete() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path()).await;
    let id = registry.register(SUBJECT, &v1()).await.1["id"]
        .as_u64()
        .unwrap();
    registry.register(SUBJECT, &v2()).await;

    let delete = |query: &'static str| {
        registry
            .client
            .delete(format!("{}/subjects/{SUBJECT}{query}", registry.base))
    };
    assert_error(&registry.send(delete("?permanent=true")).await, 404, 40405);
    assert_eq!(registry.send(delete("")).await, (200, json!([1, 2])));
    assert_eq!(registry.get("/subjects").await, (200, json!([])));
    assert_eq!(
        registry.get("/subjects?deleted=true").await,
        (200, json!([SUBJECT]))
    );
    // Ids outlive the subject.
    assert_eq!(
        registry.get(&format!("/schemas/ids/{id}")).await,
        (200, json!({"schema": v1()}))
    );
    assert_eq!(
        registry.send(delete("?permanent=true")).await,
        (200, json!([1, 2]))
    );
    assert_error(&registry.send(delete("")).await, 404, 40401);

    registry.stop().await;
}
