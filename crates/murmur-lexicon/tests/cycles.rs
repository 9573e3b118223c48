//! Self-referential lexicons generate Rust that compiles and round-trips.
//!
//! `fixtures/cycles/tree.rs` is what codegen generates for `fixtures/cycles/tree` (the unit
//! test `checked_in_tree_code_is_what_codegen_generates` keeps it so); including it here
//! compiles it: a node holding its parent, a link back to it, an inline object holding a
//! node, and the record holding its root are boxed, children stay a `Vec`.

#[allow(dead_code)]
mod generated {
    include!("fixtures/cycles/tree.rs");
}

use generated::com::example::cycles::tree::{self, LinkData, NodeData, NodeMetaData};
use murmur_lexicon::{LexiconSet, Validate};

fn leaf(name: &str) -> NodeData {
    NodeData {
        name: name.into(),
        children: None,
        link: None,
        meta: None,
        next: None,
        parent: None,
        tree: None,
    }
}

fn sample() -> tree::Record {
    let parent = leaf("parent");
    let mut child = leaf("child");
    child.parent = Some(Box::new(parent.clone().into()));
    child.meta = Some(
        NodeMetaData {
            origin: Some(Box::new(leaf("origin").into())),
        }
        .into(),
    );
    let mut root = leaf("root");
    root.children = Some(vec![child.into(), leaf("sibling").into()]);
    root.link = Some(Box::new(
        LinkData {
            target: Box::new(parent.into()),
            weight: Some(2),
        }
        .into(),
    ));
    root.next = Some(murmur_lexicon::runtime::atrium_api::types::Union::Refs(
        tree::NodeNextRefs::Node(Box::new(leaf("next").into())),
    ));
    tree::RecordData {
        root: Box::new(root.into()),
        forest: Some(vec![leaf("elsewhere").into()]),
    }
    .into_record()
}

fn lexicons() -> LexiconSet {
    LexiconSet::load_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cycles/tree"
    ))
    .unwrap()
}

#[test]
fn recursive_records_round_trip_through_json_and_dag_cbor() {
    let record = sample();
    record.validate().unwrap();
    let json = serde_json::to_value(&record).unwrap();
    assert_eq!(json["root"]["children"][0]["parent"]["name"], "parent");
    assert_eq!(json["root"]["link"]["target"]["name"], "parent");
    assert_eq!(
        json["root"]["children"][0]["meta"]["origin"]["name"],
        "origin"
    );
    let back: tree::Record = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, record);
    // The runtime validator agrees with the generated types.
    lexicons()
        .validate_record_json(tree::RecordData::NSID, &json)
        .unwrap();

    let cbor = serde_ipld_dagcbor::to_vec(&record).unwrap();
    let decoded: tree::Record = serde_ipld_dagcbor::from_slice(&cbor).unwrap();
    assert_eq!(decoded, record);
}

#[test]
fn generated_checks_reach_through_boxed_fields() {
    let mut record = sample();
    let root = &mut record.root;
    let child = &mut root.children.as_mut().unwrap()[0];
    child.parent.as_mut().unwrap().name = "x".repeat(33);
    let err = record.validate().unwrap_err();
    assert_eq!(err.path, "$.root.children[0].parent.name");

    let mut record = sample();
    record.root.link.as_mut().unwrap().weight = Some(-1);
    assert_eq!(record.validate().unwrap_err().path, "$.root.link.weight");
}

#[test]
fn deeply_nested_records_are_refused_not_overflowing() {
    // A chain of parents 200 deep: the runtime validator stops at its depth limit.
    let mut value = serde_json::json!({ "name": "bottom" });
    for i in 0..200 {
        value = serde_json::json!({ "name": format!("n{i}"), "parent": value });
    }
    let record = serde_json::json!({ "$type": "com.example.cycles.tree", "root": value });
    let errors = lexicons()
        .validate_record_json("com.example.cycles.tree", &record)
        .unwrap_err();
    assert!(
        errors.iter().any(|e| e.message == "data nested too deeply"),
        "{errors:?}"
    );
}
