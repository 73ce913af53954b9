//! The architecture invariant "core does no I/O, has no clock and no async" (ARCHITECTURE.md),
//! held by reading the core's own sources and manifest.

use std::path::Path;

/// What would read a clock, draw randomness, touch files, sockets or threads, or await.
const FORBIDDEN: &[&str] = &[
    "now_v7",
    "new_v4",
    "Utc::now",
    "Local::now",
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::net",
    "std::thread",
    "std::env",
    "tokio",
    "async fn",
    ".await",
    "rand::",
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the core's src directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_core_reads_no_clock_and_does_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() >= 10, "the core's sources were not found in {}", src.display());
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if code.contains(word) {
                    found.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "the core must stay pure; found:\n{}", found.join("\n"));
}

#[test]
fn the_core_depends_on_no_other_crate_of_the_workspace() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps = manifest.split("[dependencies]").nth(1).expect("a [dependencies] table");
    let deps = deps.split("\n[").next().unwrap_or(deps);
    let local: Vec<&str> = deps.lines().filter(|l| l.trim_start().starts_with("sourced")).collect();
    assert!(local.is_empty(), "the core depends on workspace crates: {local:?}");
}
