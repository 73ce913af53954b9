//! `permissions.yaml`: the decision of `Permissions::allows` from a table
//! (`tests/data/permissions/allows.yaml`), and the helpers the subscriptions and admin routes use.

use std::collections::BTreeMap;

use serde::Deserialize;
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::permissions::{Action, Permissions, Selection};
use sourced_core::{Principal, TypeName};

#[derive(Deserialize)]
#[serde(untagged)]
enum Who {
    Roles(Vec<String>),
    Anonymous(String),
}

#[derive(Deserialize)]
struct Case(Who, String, String, bool);

#[derive(Deserialize)]
struct Table {
    files: BTreeMap<String, String>,
    cases: Vec<Case>,
    absent: Vec<Case>,
}

fn principal(who: &Who) -> Principal {
    match who {
        Who::Roles(roles) => Principal::new("p", &["acme"], roles).unwrap(),
        Who::Anonymous(s) => {
            assert_eq!(s, "anonymous");
            Principal::anonymous()
        }
    }
}

fn check(permissions: &Permissions, cases: &[Case], what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for Case(who, action, t, expected) in cases {
        let p = principal(who);
        let t = TypeName::parse(t).unwrap();
        let got = if action == "admin" {
            permissions.allows_admin(&p)
        } else {
            permissions.allows(&p, &Action::parse(action), &t)
        };
        if got != *expected {
            failures.push(format!("{what}: {:?} {action} {t}: expected {expected}, got {got}", p.roles));
        }
    }
    failures
}

fn table() -> Table {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/permissions/allows.yaml");
    yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn allows_follows_the_table() {
    let mut table = table();
    let set = ArtifactSet::load(&table.files).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(set.permissions().is_defined());
    assert!(set.permissions().anonymous_allowed());
    let mut failures = check(set.permissions(), &table.cases, "with permissions.yaml");
    table.files.remove("permissions.yaml");
    let set = ArtifactSet::load(&table.files).unwrap();
    assert!(!set.permissions().is_defined());
    assert!(!set.permissions().anonymous_allowed());
    failures.extend(check(set.permissions(), &table.absent, "without permissions.yaml"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn types_allowed_and_readable_types() {
    let table = table();
    let set = ArtifactSet::load(&table.files).unwrap();
    let perms = set.permissions();
    let only = |names: &[&str]| Selection::Only(names.iter().map(|n| TypeName::parse(n).unwrap()).collect());
    let roles = |r: &[&str]| Principal::new("p", &["acme"], r).unwrap();
    assert_eq!(perms.readable_types(&roles(&["clerk"])), only(&["order"]));
    assert_eq!(perms.readable_types(&roles(&["clerk", "approver"])), only(&["loan", "order"]));
    assert_eq!(perms.readable_types(&roles(&["clerk", "auditor"])), Selection::All);
    assert_eq!(perms.readable_types(&roles(&["nothing"])), only(&[]));
    assert_eq!(perms.readable_types(&Principal::anonymous()), only(&["note"]));
    assert_eq!(perms.types_allowed(&roles(&["approver"]), &Action::parse("approve")), only(&["loan"]));
    assert_eq!(perms.types_allowed(&roles(&["clerk"]), &Action::Subscribe), only(&[]));
    let absent = Permissions::absent();
    assert_eq!(absent.readable_types(&roles(&[])), Selection::All);
    assert_eq!(absent.readable_types(&Principal::anonymous()), only(&[]));
}

#[test]
fn a_set_without_types_accepts_any_type_name() {
    let files: BTreeMap<String, String> = [(
        "permissions.yaml".to_owned(),
        "roles: {clerk: [{types: [order, invoice], actions: [read, list]}]}".to_owned(),
    )]
    .into();
    let set = ArtifactSet::load(&files).unwrap();
    let p = Principal::new("p", &["acme"], &["clerk"]).unwrap();
    assert!(set.permissions().allows(&p, &Action::List, &TypeName::parse("invoice").unwrap()));
    assert!(!set.permissions().allows(&p, &Action::Create, &TypeName::parse("invoice").unwrap()));
    // A custom command needs a type that defines it, and this set defines none.
    let files: BTreeMap<String, String> =
        [("permissions.yaml".to_owned(), "roles: {clerk: [{types: [\"*\"], actions: [ship]}]}".to_owned())].into();
    let problems = ArtifactSet::load(&files).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].location, "/roles/clerk/0/actions/0");
}

#[test]
fn two_permissions_files_are_a_problem() {
    let files: BTreeMap<String, String> =
        [("permissions.yaml".to_owned(), "roles: {}".to_owned()), ("permissions.json".to_owned(), "{}".to_owned())]
            .into();
    let problems = ArtifactSet::load(&files).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].message.contains("already has its permissions"), "{problems:?}");
}
