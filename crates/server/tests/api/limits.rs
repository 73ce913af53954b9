//! docs/limits.md lists every fixed limit of the service (the `*_MAX` constants of core, store,
//! engine, server and auth) with the file it lives in and its value, so a reader finds them all in one
//! place; this test keeps the table and the code the same, and every one of them in its crate's
//! `limits.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (name, file below crates/, value as written) of every `*_MAX` constant in production code.
fn constants(crates: &Path) -> BTreeSet<(String, String, String)> {
    let mut found = BTreeSet::new();
    for krate in ["core", "store", "engine", "server", "auth"] {
        let mut files = Vec::new();
        rust_files(&crates.join(krate).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let production = text.split("#[cfg(test)]").next().unwrap_or("");
            for line in production.lines() {
                let Some(rest) = line.trim_start().split("const ").nth(1).filter(|_| {
                    let head = line.trim_start();
                    head.starts_with("const ")
                        || head.starts_with("pub const ")
                        || head.starts_with("pub(crate) const ")
                }) else {
                    continue;
                };
                let Some((name, value)) =
                    rest.split_once(':').and_then(|(n, r)| Some((n.trim(), r.split_once('=')?.1)))
                else {
                    continue;
                };
                if name.ends_with("_MAX") {
                    let file = file.strip_prefix(crates).unwrap().to_string_lossy().replace('\\', "/");
                    found.insert((name.to_owned(), file, value.trim().trim_end_matches(';').trim().to_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn every_fixed_limit_is_listed() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let code = constants(crates);
    assert!(code.len() >= 30, "found only {} limits in the code", code.len());
    let elsewhere: Vec<_> = code.iter().filter(|(_, file, _)| !file.ends_with("/src/limits.rs")).collect();
    assert!(elsewhere.is_empty(), "a fixed limit is defined outside its crate's limits.rs: {elsewhere:?}");
    let doc = std::fs::read_to_string(crates.parent().unwrap().join("docs/limits.md")).unwrap();
    let listed: BTreeSet<(String, String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
            (cells[1].to_owned(), cells[2].to_owned(), cells[3].to_owned())
        })
        .collect();
    let missing: Vec<_> = code.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/limits.md is out of date: missing {missing:?}, stale {stale:?}"
    );
}
