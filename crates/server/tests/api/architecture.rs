//! The server's modules form no circle (ARCHITECTURE.md): read from the sources, each module's
//! `crate::<module>` references are its edges, and the graph they make is acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every source file of the server: (its top-level module, its path below src/, its text). A
/// directory module's files all count as that module.
fn sources() -> Vec<(String, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                let inner = inner.unwrap().path();
                if inner.extension().is_some_and(|e| e == "rs") {
                    let name = format!("{stem}/{}", inner.file_name().unwrap().to_string_lossy());
                    out.push((stem.clone(), name, std::fs::read_to_string(&inner).unwrap()));
                }
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((stem, name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<_> = sources().into_iter().filter(|(m, _, _)| m != "lib" && m != "main").collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (m, _, text) in &files {
        let used = text
            .split("crate::")
            .skip(1)
            .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
            .filter(|u| modules.contains(u) && u != m);
        graph.get_mut(m).unwrap().extend(used);
    }
    graph
}

/// A cycle through `at`, if the walk from it finds one.
fn cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    at: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == at) {
        let mut c = path[i..].to_vec();
        c.push(at.to_owned());
        return Some(c);
    }
    if done.contains(at) {
        return None;
    }
    path.push(at.to_owned());
    for next in &graph[at] {
        if let Some(c) = cycle(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(at.to_owned());
    None
}

#[test]
fn the_server_modules_form_no_circle() {
    let graph = edges();
    assert!(graph.len() >= 15, "found only {} modules", graph.len());
    assert!(graph["router"].contains("http"), "the walk must see edges: {graph:?}");
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = cycle(&graph, m, &mut Vec::new(), &mut done) {
            panic!("the server's modules form a circle: {}", c.join(" -> "));
        }
    }
    // The leaves that every handler shares import no handler module.
    for leaf in ["state", "request", "problem", "settings"] {
        for handler in ["http", "ws", "sse", "socketio", "openapi", "router"] {
            assert!(!graph[leaf].contains(handler), "{leaf} imports {handler}");
        }
    }
}

/// problem.rs is the one table of problems: no other module builds one from a status and a slug.
#[test]
fn problems_are_built_only_in_problem_rs() {
    let mut found = Vec::new();
    for (_, name, text) in sources() {
        if name == "problem.rs" {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if line.contains("Problem::new(") {
                found.push(format!("{name}:{}", n + 1));
            }
        }
    }
    assert!(found.is_empty(), "problems built by hand outside problem.rs (give them a constructor there): {found:?}");
}

/// Every handler of a tenant's data takes the `Caller` extractor, the one place where who asks
/// and for which tenant is resolved; only the public probes and documents do not.
#[test]
fn every_handler_takes_the_caller() {
    const PUBLIC: &[&str] = &["healthz", "readyz", "schema_file"];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let router = std::fs::read_to_string(src.join("router.rs")).unwrap();
    let imported = router.split("use crate::http::{").nth(1).unwrap().split("};").next().unwrap();
    let handlers: Vec<&str> = imported.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
    assert!(handlers.len() >= 12, "found {handlers:?}");
    let http = std::fs::read_to_string(src.join("http.rs")).unwrap();
    for handler in handlers {
        let signature = http
            .split(&format!("async fn {handler}("))
            .nth(1)
            .and_then(|rest| rest.split(") ->").next())
            .unwrap_or_else(|| panic!("no handler {handler} in http.rs"));
        let takes = signature.contains(": Caller");
        assert_eq!(takes, !PUBLIC.contains(&handler), "{handler}: takes the Caller: {takes}");
    }
    for (file, upgrade) in [("ws/mod.rs", "async fn upgrade("), ("sse.rs", "fn live_feed(")] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let signature = text.split(upgrade).nth(1).unwrap().split(") ->").next().unwrap();
        assert!(signature.contains("Caller"), "{file}'s entry point takes no Caller");
    }
}

/// The server talks to the engine only: no handler reaches the store past it. Only `lib.rs`
/// (opening, closing and the store's statistics) and the CLI's `transfer.rs` hold a store.
#[test]
fn handlers_reach_the_store_only_through_the_engine() {
    let mut found = Vec::new();
    for (_, name, text) in sources() {
        if ["lib.rs", "main.rs", "transfer.rs"].contains(&name.as_str()) {
            continue;
        }
        // Tests of a module may build a store to run it on.
        let production = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in production.lines().enumerate() {
            if line.contains(".store()") || line.contains("dyn EventStore") {
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "the server reaches the store past the engine:\n{}", found.join("\n"));
}

/// Tidy check: every `crates/...` path ARCHITECTURE.md names exists, so the code map cannot
/// keep a file that was moved or removed.
#[test]
fn every_path_named_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let paths: BTreeSet<&str> = text
        .match_indices("crates/")
        .map(|(at, _)| {
            let rest = &text[at..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c))).unwrap_or(rest.len());
            rest[..end].trim_end_matches(['.', '/'])
        })
        .collect();
    assert!(paths.len() >= 10, "found only {} paths: {paths:?}", paths.len());
    let missing: Vec<_> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(missing.is_empty(), "ARCHITECTURE.md names paths that do not exist: {missing:?}");
}
