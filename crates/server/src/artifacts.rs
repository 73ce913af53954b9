//! Reading an artifact set from a directory (SPEC §4): every file under it, bounded in count
//! and size, handed to the core's checker, which reports every problem at once.

use std::collections::BTreeMap;
use std::path::Path;

use sourced_core::artifacts::{ArtifactSet, FILE_BYTES_MAX, FILES_MAX, Problem};

/// Deepest directory nesting read.
const DEPTH_MAX: usize = 8;

/// Reads and checks the set under `dir`.
pub fn load_dir(dir: &Path) -> Result<ArtifactSet, Vec<Problem>> {
    let mut files = BTreeMap::new();
    let mut problems = Vec::new();
    walk(dir, dir, 0, &mut files, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    ArtifactSet::load(&files)
}

fn problem(file: String, message: String) -> Problem {
    Problem { file, location: String::new(), message }
}

fn walk(root: &Path, dir: &Path, depth: usize, files: &mut BTreeMap<String, String>, problems: &mut Vec<Problem>) {
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_string_lossy().replace('\\', "/");
    if depth > DEPTH_MAX {
        problems.push(problem(rel(dir), format!("nested deeper than {DEPTH_MAX} directories")));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(problem(rel(dir), format!("cannot read the directory: {e}")));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // .git and other hidden files are not artifacts
        }
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            walk(root, &path, depth + 1, files, problems);
        } else if kind.is_file() {
            if files.len() >= FILES_MAX {
                problems.push(problem(rel(&path), format!("the set has more than {FILES_MAX} files")));
                return;
            }
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > FILE_BYTES_MAX as u64 => {
                    problems.push(problem(rel(&path), format!("larger than {FILE_BYTES_MAX} bytes")));
                }
                _ => match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        files.insert(rel(&path), text);
                    }
                    Err(e) => problems.push(problem(rel(&path), format!("cannot read: {e}"))),
                },
            }
        }
    }
}
