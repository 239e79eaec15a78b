//! Interoperability with a real Confluent client.
//!
//! The rest of the crate talks to the registry through `schema_registry_converter`, so the
//! strongest evidence that this registry is "Confluent compatible" is that client encoding and
//! decoding through it: registration, fetch by id, latest version, subject listing and the
//! compatibility endpoint, with the client's own request shapes and response parsing.

use std::sync::Arc;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{
    get_all_subjects, get_all_versions, get_schema_by_subject_and_version, is_compatible_schema,
    post_schema, SrSettings,
};
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use tokio_util::sync::CancellationToken;

use super::{router, Store};

const NAME: &str = "blindstrader.tenancy.OrganisationCreated";

fn schema(extra_fields: &str) -> SuppliedSchema {
    SuppliedSchema::new(
        Some(NAME.to_owned()),
        SchemaType::Avro,
        format!(
            r#"{{"type":"record","name":"OrganisationCreated","namespace":"blindstrader.tenancy","fields":[{{"name":"organisation_id","type":"string"}}{extra_fields}]}}"#
        ),
    )
}

#[tokio::test]
async fn schema_registry_converter_round_trips_through_this_registry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let stopped = shutdown.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        axum::serve(listener, router(Arc::new(Store::in_memory())))
            .with_graceful_shutdown(stopped)
            .await
    });
    let settings = SrSettings::new_builder(url).no_proxy().build().unwrap();

    // Encode with the topic-name strategy: registers `organisations-value` and frames the
    // payload with magic byte 0 and the 4-byte big-endian id.
    let encoder = AvroEncoder::new(settings.clone());
    let strategy =
        SubjectNameStrategy::TopicNameStrategyWithSchema("organisations".into(), false, schema(""));
    let bytes = encoder
        .encode(
            vec![("organisation_id", Value::String("org-1".into()))],
            strategy,
        )
        .await
        .unwrap();
    assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);

    // Decode fetches the writer schema by id.
    let decoded = AvroDecoder::new(settings.clone())
        .decode(Some(&bytes))
        .await
        .unwrap();
    assert_eq!(
        decoded.value,
        Value::Record(vec![(
            "organisation_id".into(),
            Value::String("org-1".into())
        )])
    );

    assert_eq!(
        get_all_subjects(&settings).await.unwrap(),
        vec!["organisations-value"]
    );
    let evolved = schema(r#",{"name":"name","type":"string","default":""}"#);
    assert!(
        is_compatible_schema(&settings, "organisations-value".into(), evolved.clone())
            .await
            .unwrap()
    );
    let breaking = schema(r#",{"name":"plan","type":"string"}"#);
    assert!(
        !is_compatible_schema(&settings, "organisations-value".into(), breaking.clone())
            .await
            .unwrap()
    );
    let registered = post_schema(&settings, "organisations-value".into(), evolved)
        .await
        .unwrap();
    assert_eq!(registered.id, 2);
    assert!(
        post_schema(&settings, "organisations-value".into(), breaking)
            .await
            .is_err()
    );
    assert_eq!(
        get_all_versions(&settings, "organisations-value".into())
            .await
            .unwrap(),
        vec![1, 2]
    );
    let latest = get_schema_by_subject_and_version(&settings, "organisations-value", None)
        .await
        .unwrap();
    assert_eq!((latest.id, latest.version), (2, Some(2)));
    assert_eq!(latest.schema_type, SchemaType::Avro);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
