//! Compatibility levels and the check that enforces them.
//!
//! The point of a schema registry is that producers cannot publish a schema that existing
//! consumers (or future consumers reading old data) are unable to decode. Confluent expresses
//! that as a per-subject *level*; this module owns what each level means so the store only has
//! to hand over "the new schema and the subject's live versions, oldest first".
//!
//! The actual Avro schema-resolution rules come from
//! [`apache_avro::schema_compatibility::SchemaCompatibility`]. It answers `Full`, `Partial` or
//! an error; `Partial` (for example a reader enum missing some writer symbols, or a writer union
//! branch the reader lacks) means *some* data would fail to decode, which Confluent treats as
//! incompatible, so only `Full` passes here.

use std::fmt;
use std::str::FromStr;

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use super::error::RegistryError;

/// A Confluent compatibility level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityLevel {
    /// No checks at all.
    None,
    /// The new schema can read data written with the latest version. Confluent's default:
    /// consumers can be upgraded before producers.
    #[default]
    Backward,
    /// The new schema can read data written with every version.
    BackwardTransitive,
    /// The latest version can read data written with the new schema.
    Forward,
    /// Every version can read data written with the new schema.
    ForwardTransitive,
    /// Backward and forward against the latest version.
    Full,
    /// Backward and forward against every version.
    FullTransitive,
}

impl CompatibilityLevel {
    /// Every level, in Confluent's documentation order.
    pub const ALL: [CompatibilityLevel; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    /// The wire name, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the level applies to every earlier version rather than only the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    fn checks_backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn checks_forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompatibilityLevel {
    type Err = RegistryError;

    /// Case-insensitive, as Confluent accepts `backward` as well as `BACKWARD`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or(RegistryError::InvalidCompatibilityLevel)
    }
}

/// Checks `candidate` against a subject's existing versions under `level`.
///
/// `existing` is `(version, schema)` ordered oldest first. Non-transitive levels only look at
/// the last entry (the latest version); callers that want to check against one specific version
/// pass a one-element slice. Returns one human-readable message per failed check; an empty
/// vector means compatible.
pub fn check(
    level: CompatibilityLevel,
    candidate: &Schema,
    existing: &[(u32, Schema)],
) -> Vec<String> {
    let against: &[(u32, Schema)] = if level.is_transitive() {
        existing
    } else {
        existing.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut problems = Vec::new();
    for (version, previous) in against {
        if level.checks_backward() {
            // Backward: the new schema is the reader of data written with the old one.
            if let Some(why) = cannot_read(previous, candidate) {
                problems.push(format!(
                    "{level}: the new schema cannot read data written with version {version}: {why}"
                ));
            }
        }
        if level.checks_forward() {
            // Forward: the old schema is the reader of data written with the new one.
            if let Some(why) = cannot_read(candidate, previous) {
                problems.push(format!(
                    "{level}: version {version} cannot read data written with the new schema: {why}"
                ));
            }
        }
    }
    problems
}

/// Why `reader` cannot decode everything `writer` can produce, or `None` if it can.
fn cannot_read(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => Some(
            "only some values can be resolved (missing enum symbols or union branches)".to_owned(),
        ),
        Err(err) => Some(error_chain(&err)),
    }
}

/// An error and all its sources, joined, since apache-avro nests the interesting part
/// (e.g. which field lacks a default) in the source of a field mismatch.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"Organisation","namespace":"t","fields":[{fields}]}}"#
        ))
        .expect("test schema parses")
    }

    fn v1() -> Schema {
        schema(r#"{"name":"id","type":"string"}"#)
    }

    fn with_default() -> Schema {
        schema(r#"{"name":"id","type":"string"},{"name":"name","type":"string","default":""}"#)
    }

    fn without_default() -> Schema {
        schema(r#"{"name":"id","type":"string"},{"name":"name","type":"string"}"#)
    }

    #[test]
    fn level_names_round_trip_case_insensitively() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(level.as_str().parse::<CompatibilityLevel>().unwrap(), level);
            assert_eq!(
                level
                    .as_str()
                    .to_lowercase()
                    .parse::<CompatibilityLevel>()
                    .unwrap(),
                level
            );
            let json = serde_json::to_string(&level).unwrap();
            assert_eq!(json, format!("\"{}\"", level.as_str()));
        }
        assert!(matches!(
            "SIDEWAYS".parse::<CompatibilityLevel>(),
            Err(RegistryError::InvalidCompatibilityLevel)
        ));
        assert_eq!(CompatibilityLevel::default(), CompatibilityLevel::Backward);
    }

    #[test]
    fn adding_a_field_with_default_is_backward_and_forward_compatible() {
        let existing = [(1, v1())];
        assert!(check(CompatibilityLevel::Backward, &with_default(), &existing).is_empty());
        assert!(check(CompatibilityLevel::Forward, &with_default(), &existing).is_empty());
        assert!(check(CompatibilityLevel::Full, &with_default(), &existing).is_empty());
    }

    #[test]
    fn adding_a_field_without_default_is_not_backward_compatible() {
        let existing = [(1, v1())];
        let problems = check(CompatibilityLevel::Backward, &without_default(), &existing);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("version 1"), "{}", problems[0]);
        assert!(problems[0].contains("name"), "{}", problems[0]);
        // ...but old readers simply ignore the new field.
        assert!(check(CompatibilityLevel::Forward, &without_default(), &existing).is_empty());
        assert_eq!(
            check(CompatibilityLevel::Full, &without_default(), &existing).len(),
            1
        );
        assert!(check(CompatibilityLevel::None, &without_default(), &existing).is_empty());
    }

    #[test]
    fn removing_a_field_is_backward_but_not_forward_compatible() {
        let existing = [(1, without_default())];
        assert!(check(CompatibilityLevel::Backward, &v1(), &existing).is_empty());
        assert_eq!(
            check(CompatibilityLevel::Forward, &v1(), &existing).len(),
            1
        );
    }

    #[test]
    fn type_change_is_incompatible() {
        let existing = [(1, v1())];
        let changed = schema(r#"{"name":"id","type":"int"}"#);
        let problems = check(CompatibilityLevel::Backward, &changed, &existing);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("id"), "{}", problems[0]);
    }

    #[test]
    fn non_transitive_levels_only_check_the_latest_version() {
        // The candidate adds `x` without a default, so it cannot read data from either
        // version; a non-transitive level reports only the latest (version 2).
        let existing = [(1, v1()), (2, without_default())];
        let candidate = schema(
            r#"{"name":"id","type":"string"},{"name":"name","type":"string"},{"name":"x","type":"int"}"#,
        );
        let latest_only = check(CompatibilityLevel::Backward, &candidate, &existing);
        assert_eq!(latest_only.len(), 1);
        assert!(latest_only[0].contains("version 2"), "{}", latest_only[0]);
        let all = check(
            CompatibilityLevel::BackwardTransitive,
            &candidate,
            &existing,
        );
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].contains("version 1"), "{}", all[0]);
    }

    #[test]
    fn transitive_catches_incompatibility_with_older_versions_only() {
        // v1 lacks `name`; v2 adds it with a default; candidate drops the default.
        // Candidate reads v2 data fine but not v1 data.
        let existing = [(1, v1()), (2, with_default())];
        assert!(check(CompatibilityLevel::Backward, &without_default(), &existing).is_empty());
        let problems = check(
            CompatibilityLevel::BackwardTransitive,
            &without_default(),
            &existing,
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("version 1"), "{}", problems[0]);
    }

    #[test]
    fn partial_enum_compatibility_counts_as_incompatible() {
        let writer =
            Schema::parse_str(r#"{"type":"enum","name":"Plan","symbols":["FREE","PRO"]}"#).unwrap();
        let reader =
            Schema::parse_str(r#"{"type":"enum","name":"Plan","symbols":["FREE"]}"#).unwrap();
        let problems = check(CompatibilityLevel::Backward, &reader, &[(1, writer)]);
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn no_existing_versions_is_always_compatible() {
        for level in CompatibilityLevel::ALL {
            assert!(check(level, &without_default(), &[]).is_empty());
        }
    }
}
