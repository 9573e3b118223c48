//! Reference cycles between definitions, and which of them a lexicon set can live with.
//!
//! Three graphs over data definitions (records and reusable types), each keyed by the
//! canonical `nsid#name`:
//!
//! - **alias**: a non-object definition (`array`, `string`, ...) to the non-object definitions
//!   its type expands into. Codegen emits these as `type` aliases, so a cycle here
//!   (`b: array of #c`, `c: array of #b`) would be an infinitely nested alias; it is refused.
//! - **containment**: an object or record to the objects and records it holds directly (not
//!   behind an array, which is a `Vec`, or a union, whose members are boxed). A cycle here is
//!   an infinitely sized struct; codegen breaks it by boxing the fields on the cycle.
//! - **required**: among definitions no finite value can satisfy, the ones each one requires.
//!   A cycle here (`a` requires a non-null `b`, `b` requires a non-null `a`) admits no record
//!   at all; it is refused.
//!
//! Every walk here is over the finite schema tree or iterative over the graph: no walk
//! follows references recursively, so cyclic lexicons cannot make it recurse forever.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::LexiconSet;
use crate::lint::{LintIssue, Rule};
use crate::schema::{FieldType, ObjectType, UserType};

/// A directed graph over canonical `nsid#name` definition names.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn add(&mut self, from: &str, to: String) {
        self.edges.entry(from.to_owned()).or_default().insert(to);
    }

    /// Every node reachable from `from` through one edge or more.
    pub(crate) fn reach(&self, from: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<&str> = VecDeque::from([from]);
        while let Some(node) = queue.pop_front() {
            for next in self.edges.get(node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    queue.push_back(next);
                }
            }
        }
        seen
    }

    /// One shortest cycle per strongly connected component that has a cycle, as the chain of
    /// names from its smallest member back to it (`[a, b, a]`).
    pub(crate) fn cycles(&self) -> Vec<Vec<String>> {
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        for start in self.edges.keys() {
            if done.contains(start) {
                continue;
            }
            let reach = self.reach(start);
            if !reach.contains(start) {
                continue;
            }
            // The component: nodes reachable from `start` that reach back to it.
            for node in &reach {
                if self.reach(node).contains(start) {
                    done.insert(node.clone());
                }
            }
            out.push(self.shortest_cycle(start));
        }
        out
    }

    /// The shortest path from `start` back to itself (it must exist).
    fn shortest_cycle(&self, start: &str) -> Vec<String> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue: VecDeque<&str> = VecDeque::from([start]);
        while let Some(node) = queue.pop_front() {
            for next in self.edges.get(node).into_iter().flatten() {
                if next == start {
                    let mut chain = vec![start.to_owned()];
                    let mut at = node;
                    while at != start {
                        chain.push(at.to_owned());
                        at = parent[at];
                    }
                    chain.push(start.to_owned());
                    chain.reverse();
                    return chain;
                }
                if !parent.contains_key(next.as_str()) {
                    parent.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        vec![start.to_owned(), start.to_owned()]
    }
}

/// The data definitions of the set's own documents: `(nsid, canonical name, def)`.
fn data_defs(set: &LexiconSet) -> impl Iterator<Item = (&str, String, &UserType)> {
    set.docs().flat_map(|doc| {
        doc.defs
            .iter()
            .filter(|(_, def)| matches!(def, UserType::Record(_) | UserType::Type(_)))
            .map(move |(name, def)| (doc.id.as_str(), format!("{}#{name}", doc.id), def))
    })
}

/// Whether a definition becomes a Rust struct (object or record), not a type alias.
fn is_struct(def: &UserType) -> bool {
    matches!(
        def,
        UserType::Record(_) | UserType::Type(FieldType::Object(_))
    )
}

/// Alias definitions to the alias definitions their `type` alias expands into.
pub(crate) fn alias_graph(set: &LexiconSet) -> Graph {
    fn walk(set: &LexiconSet, from: &str, nsid: &str, ty: &FieldType, g: &mut Graph) {
        match ty {
            FieldType::Array(a) => walk(set, from, nsid, &a.items, g),
            FieldType::Ref(r) => {
                if let Some((full, def @ UserType::Type(_))) = set.resolve(&r.reference, nsid)
                    && !is_struct(def)
                {
                    g.add(from, full);
                }
            }
            _ => {}
        }
    }
    let mut g = Graph::default();
    for (nsid, full, def) in data_defs(set) {
        if let UserType::Type(ty) = def
            && !is_struct(def)
        {
            walk(set, &full, nsid, ty, &mut g);
        }
    }
    g
}

/// Objects and records to the objects and records they hold directly (not behind an array
/// or a union).
#[cfg(any(feature = "codegen", test))]
pub(crate) fn containment_graph(set: &LexiconSet) -> Graph {
    fn object(set: &LexiconSet, from: &str, nsid: &str, o: &ObjectType, g: &mut Graph) {
        for ty in o.properties.values() {
            match ty {
                FieldType::Object(inner) => object(set, from, nsid, inner, g),
                FieldType::Ref(r) => {
                    if let Some((full, def)) = set.resolve(&r.reference, nsid)
                        && is_struct(def)
                    {
                        g.add(from, full);
                    }
                }
                _ => {}
            }
        }
    }
    let mut g = Graph::default();
    for (nsid, full, def) in data_defs(set) {
        match def {
            UserType::Record(r) => object(set, &full, nsid, &r.record, &mut g),
            UserType::Type(FieldType::Object(o)) => object(set, &full, nsid, o, &mut g),
            _ => {}
        }
    }
    g
}

/// Whether some finite value fits `ty`, given which definitions are known to have one.
/// Refs that do not resolve to data count as satisfiable (lint reports them on their own).
fn satisfiable(set: &LexiconSet, nsid: &str, ty: &FieldType, known: &BTreeSet<String>) -> bool {
    match ty {
        FieldType::Array(a) => {
            a.min_length.unwrap_or(0) == 0 || satisfiable(set, nsid, &a.items, known)
        }
        FieldType::Object(o) => object_satisfiable(set, nsid, o, known),
        FieldType::Ref(r) => match set.resolve(&r.reference, nsid) {
            Some((full, UserType::Record(_) | UserType::Type(_))) => known.contains(&full),
            _ => true,
        },
        FieldType::Union(u) => {
            !u.closed
                || u.refs.iter().any(|r| match set.resolve(r, nsid) {
                    Some((full, UserType::Record(_) | UserType::Type(_))) => known.contains(&full),
                    _ => true,
                })
        }
        _ => true,
    }
}

fn object_satisfiable(
    set: &LexiconSet,
    nsid: &str,
    o: &ObjectType,
    known: &BTreeSet<String>,
) -> bool {
    o.properties.iter().all(|(name, ty)| {
        !o.required.contains(name) || o.nullable.contains(name) || satisfiable(set, nsid, ty, known)
    })
}

/// Definitions that no finite value satisfies, each to the unsatisfiable definitions it
/// requires.
pub(crate) fn required_graph(set: &LexiconSet) -> Graph {
    let defs: Vec<_> = data_defs(set).collect();
    let mut known = BTreeSet::new();
    loop {
        let before = known.len();
        for (nsid, full, def) in &defs {
            if known.contains(full) {
                continue;
            }
            let ok = match def {
                UserType::Record(r) => object_satisfiable(set, nsid, &r.record, &known),
                UserType::Type(ty) => satisfiable(set, nsid, ty, &known),
                _ => true,
            };
            if ok {
                known.insert(full.clone());
            }
        }
        if known.len() == before {
            break;
        }
    }
    fn required(
        set: &LexiconSet,
        from: &str,
        nsid: &str,
        ty: &FieldType,
        known: &BTreeSet<String>,
        g: &mut Graph,
    ) {
        let target = |r: &str, g: &mut Graph| {
            if let Some((full, UserType::Record(_) | UserType::Type(_))) = set.resolve(r, nsid)
                && !known.contains(&full)
            {
                g.add(from, full);
            }
        };
        match ty {
            FieldType::Array(a) if a.min_length.unwrap_or(0) > 0 => {
                required(set, from, nsid, &a.items, known, g)
            }
            FieldType::Object(o) => required_fields(set, from, nsid, o, known, g),
            FieldType::Ref(r) => target(&r.reference, g),
            FieldType::Union(u) if u.closed => {
                for r in &u.refs {
                    target(r, g);
                }
            }
            _ => {}
        }
    }
    fn required_fields(
        set: &LexiconSet,
        from: &str,
        nsid: &str,
        o: &ObjectType,
        known: &BTreeSet<String>,
        g: &mut Graph,
    ) {
        for (name, ty) in &o.properties {
            if o.required.contains(name) && !o.nullable.contains(name) {
                required(set, from, nsid, ty, known, g);
            }
        }
    }
    let mut g = Graph::default();
    for (nsid, full, def) in &defs {
        if known.contains(full) {
            continue;
        }
        match def {
            UserType::Record(r) => required_fields(set, full, nsid, &r.record, &known, &mut g),
            UserType::Type(ty) => required(set, full, nsid, ty, &known, &mut g),
            _ => {}
        }
    }
    g
}

/// Why generated Rust cannot represent an alias cycle, and what to change.
pub(crate) const ALIAS_CYCLE_WHY: &str = "every definition in it is an array (or other non-object type), which Rust codegen emits as a `type` alias, and a cycle of aliases is an infinite type; make one definition in the cycle an object (e.g. one with the array as a field)";

/// Why no record can satisfy a required cycle, and what to change.
pub(crate) const REQUIRED_CYCLE_WHY: &str = "every step is a required, non-nullable field (or a non-empty array, or a closed union), so no finite value satisfies it; make one field in the cycle optional or nullable";

/// Lint issues for the cycles a set cannot live with, one per cycle, reported at its first
/// definition.
pub(crate) fn lint(set: &LexiconSet) -> Vec<LintIssue> {
    let mut issues = Vec::new();
    for (graph, why) in [
        (alias_graph(set), ALIAS_CYCLE_WHY),
        (required_graph(set), REQUIRED_CYCLE_WHY),
    ] {
        for cycle in graph.cycles() {
            let (nsid, name) = cycle[0].split_once('#').unwrap_or((&cycle[0], "main"));
            issues.push(LintIssue {
                file: set.file(nsid).map(std::path::Path::to_path_buf),
                path: format!("$.defs.{name}"),
                rule: Rule::RefCycle,
                message: format!("reference cycle {}: {why}", cycle.join(" -> ")),
            });
        }
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> LexiconSet {
        let dir = format!(
            "{}/tests/fixtures/cycles/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let (set, issues) = LexiconSet::load_dir_unchecked(dir).unwrap();
        assert_eq!(issues, vec![]);
        set
    }

    fn set(defs: serde_json::Value) -> LexiconSet {
        let mut set = LexiconSet::new();
        let doc = serde_json::json!({ "lexicon": 1, "id": "com.example.cyc", "defs": defs });
        set.insert_json(&doc.to_string(), None).unwrap();
        set
    }

    fn ref_cycles(set: &LexiconSet) -> Vec<String> {
        set.lint()
            .into_iter()
            .filter(|i| i.rule == Rule::RefCycle)
            .map(|i| format!("{} {}", i.path, i.message))
            .collect()
    }

    #[test]
    fn array_cycle_is_linted_naming_the_defs() {
        let set = fixture("arrays");
        let issues = set.lint();
        assert_eq!(issues.len(), 1, "{issues:?}");
        let issue = &issues[0];
        assert_eq!(issue.rule.name(), "ref-cycle");
        assert_eq!(issue.path, "$.defs.b");
        assert!(
            issue.file.as_ref().unwrap().ends_with("arrays/arrays.json"),
            "{issue}"
        );
        assert!(
            issue.message.contains(
                "com.example.cycles.arrays#b -> com.example.cycles.arrays#c -> com.example.cycles.arrays#b"
            ),
            "{issue}"
        );
        assert!(
            issue
                .message
                .contains("make one definition in the cycle an object")
        );
    }

    #[test]
    fn array_self_cycle_and_nested_arrays_are_linted() {
        let set = set(serde_json::json!({
            "d": { "type": "array", "items": { "type": "ref", "ref": "#d" } },
            "e": { "type": "array", "items": { "type": "array", "items": { "type": "ref", "ref": "#f" } } },
            "f": { "type": "array", "items": { "type": "ref", "ref": "#e" } }
        }));
        let found = ref_cycles(&set);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0]
                .starts_with("$.defs.d reference cycle com.example.cyc#d -> com.example.cyc#d:"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with(
                "$.defs.e reference cycle com.example.cyc#e -> com.example.cyc#f -> com.example.cyc#e:"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn objects_requiring_each_other_are_linted_naming_the_defs() {
        let set = fixture("required");
        let issues = set.lint();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].rule, Rule::RefCycle);
        assert_eq!(issues[0].path, "$.defs.a");
        assert!(
            issues[0].message.contains(
                "com.example.cycles.required#a -> com.example.cycles.required#b -> com.example.cycles.required#a"
            ),
            "{}",
            issues[0]
        );
        assert!(issues[0].message.contains("no finite value"));
    }

    #[test]
    fn required_cycles_through_non_empty_arrays_and_closed_unions_are_linted() {
        let set = set(serde_json::json!({
            "a": { "type": "object", "required": ["xs"], "properties": {
                "xs": { "type": "array", "minLength": 1, "items": { "type": "ref", "ref": "#a" } } } },
            "b": { "type": "object", "required": ["u"], "properties": {
                "u": { "type": "union", "closed": true, "refs": ["#b"] } } }
        }));
        let found = ref_cycles(&set);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("com.example.cyc#a -> com.example.cyc#a"));
        assert!(found[1].contains("com.example.cyc#b -> com.example.cyc#b"));
    }

    #[test]
    fn cycles_with_a_way_out_lint_clean() {
        assert_eq!(fixture("tree").lint(), vec![]);
        // Each way out of a cycle: optional, nullable, possibly-empty array, open union.
        let set = set(serde_json::json!({
            "optional": { "type": "object", "properties": { "next": { "type": "ref", "ref": "#optional" } } },
            "nullable": { "type": "object", "required": ["next"], "nullable": ["next"],
                "properties": { "next": { "type": "ref", "ref": "#nullable" } } },
            "empty": { "type": "object", "required": ["next"],
                "properties": { "next": { "type": "array", "items": { "type": "ref", "ref": "#empty" } } } },
            "open": { "type": "object", "required": ["next"],
                "properties": { "next": { "type": "union", "refs": ["#open"] } } },
            "wrapped": { "type": "array", "items": { "type": "ref", "ref": "#holder" } },
            "holder": { "type": "object", "properties": { "items": { "type": "ref", "ref": "#wrapped" } } }
        }));
        assert_eq!(set.lint(), vec![]);
    }

    #[test]
    fn containment_graph_skips_arrays_and_unions() {
        let set = fixture("tree");
        let g = containment_graph(&set);
        let node = "com.example.cycles.tree#node";
        let reach = g.reach(node);
        assert!(reach.contains(node));
        assert!(reach.contains("com.example.cycles.tree#link"));
        assert!(reach.contains("com.example.cycles.tree#main"));
        assert!(!reach.contains("com.example.cycles.tree#forest"));
        // `forest` (an array alias) holds nodes only through a Vec.
        assert!(g.reach("com.example.cycles.tree#forest").is_empty());
        assert_eq!(alias_graph(&set).cycles(), Vec::<Vec<String>>::new());
    }
}
