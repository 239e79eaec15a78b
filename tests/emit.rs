//! `tenancy emit` refuses bad input with the line and field, and sends nothing of it.

mod common;

use blindstrader_tenancy::topics::Topic;
use common::*;

#[test]
fn bad_lines_are_reported_and_nothing_is_sent() {
    let t = TestNs::new();
    let org = new_id();
    let lines = vec![
        created_line(&new_id(), &org, "BRAND", "goodone"),
        r#"{"type":"OrganisationExploded","organisation_id":"x"}"#.to_string(),
        created_line(&new_id(), &org, "WHOLESALER", "okslug"),
        created_line(&new_id(), &org, "BRAND", "Not A Slug"),
        format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{org}","organisation_type":"BRAND","slug":"x"}}"#
        ),
        format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{org}","organisation_type":"BRAND","slug":"x","name":"n","occurred_at":"yesterday"}}"#
        ),
        "{ not json".to_string(),
    ];
    let out = t.emit(&lines, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "line 2: field `type`: unknown event type \"OrganisationExploded\"",
        "line 3: OrganisationCreated field `organisation_type`: \"WHOLESALER\" is not one of BRAND, SUPPLIER, RETAILER",
        "line 4: field `slug`: invalid slug \"Not A Slug\"",
        "line 5: OrganisationCreated field `name`: missing",
        "line 6: OrganisationCreated field `occurred_at`: \"yesterday\" is not an RFC 3339 timestamp",
        "line 7: not valid JSON",
        "6 bad line(s); nothing was sent",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("line 1:"), "line 1 is fine:\n{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        t.message_count(Topic::Organisations),
        0,
        "the good line must not be sent either"
    );

    // --dry-run accepts the good line alone and sends nothing.
    let dry = t.emit(&lines[..1], &["--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(t.message_count(Topic::Organisations), 0);

    // And the same good line, sent for real, lands once.
    t.emit_ok(&lines[..1]);
    assert_eq!(t.message_count(Topic::Organisations), 1);
}

#[test]
fn every_subcommand_explains_itself() {
    let t = TestNs::new();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["emit", "--help"],
        vec!["registry", "--help"],
        vec!["tenants", "list", "--help"],
        vec!["topics", "create", "--help"],
    ] {
        let out = t.tenancy().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: tenancy"), "{args:?}: {text}");
    }
}
