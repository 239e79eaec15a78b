//! Topic names of a namespace (docs/architecture.md, "Names") and their creation on first use.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
use crate::tenant::Namespace;

/// The topics of one namespace; `{ns}.{suffix}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Organisations,
    Tenancy,
    BrandCatalog,
    BrandAccess,
    RetailerDomains,
    DeadLetter,
}

impl Topic {
    pub const ALL: [Topic; 6] = [
        Topic::Organisations,
        Topic::Tenancy,
        Topic::BrandCatalog,
        Topic::BrandAccess,
        Topic::RetailerDomains,
        Topic::DeadLetter,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Topic::Organisations => "organisations",
            Topic::Tenancy => "tenancy",
            Topic::BrandCatalog => "brand-catalog",
            Topic::BrandAccess => "brand-access",
            Topic::RetailerDomains => "retailer-domains",
            Topic::DeadLetter => "dead-letter",
        }
    }

    pub fn name(self, ns: &Namespace) -> String {
        format!("{}.{}", ns, self.suffix())
    }

    /// The topic a full topic name refers to, if it belongs to `ns`.
    pub fn from_name(ns: &Namespace, name: &str) -> Option<Topic> {
        let suffix = name.strip_prefix(ns.as_str())?.strip_prefix('.')?;
        Topic::ALL.into_iter().find(|t| t.suffix() == suffix)
    }
}

/// Creates every topic of the namespace that does not exist yet.
///
/// The local broker (Tansu) does not auto-create topics, and a producer to a missing topic
/// only fails after its message timeout; creating them up front turns that into a clear error.
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.kafka_client_config().create()?;
    let names: Vec<String> = Topic::ALL
        .iter()
        .map(|t| t.name(&config.namespace))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, config.partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create topics at {}: {e} (is the broker up? try scripts/stack up)",
                config.kafka_bootstrap_servers
            )
        })?;
    let mut denied = Vec::new();
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // A principal that may only produce (broker ACLs): fine if the topic exists.
            Err((
                topic,
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            )) => denied.push(topic),
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    if !denied.is_empty() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let probe: BaseConsumer = config.kafka_client_config().create()?;
        for topic in &denied {
            let meta = probe.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let exists = meta
                .topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
            anyhow::ensure!(
                exists,
                "topic {topic} does not exist and this principal may not create it: run `tenancy \
                 topics create` as the processors' principal first"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_round_trip() {
        let ns = Namespace::parse("blindstrader").unwrap();
        for t in Topic::ALL {
            assert_eq!(Topic::from_name(&ns, &t.name(&ns)), Some(t));
        }
        assert_eq!(Topic::BrandCatalog.name(&ns), "blindstrader.brand-catalog");
        assert_eq!(Topic::from_name(&ns, "other.organisations"), None);
    }
}
