//! Reading an artifact set (SPEC §4) from a directory or a git repository (`git.rs` checks
//! it out first): every file under it, bounded in count and size, handed to the core's
//! checker, which reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sourced_core::artifacts::expr::ExprLimits;
use sourced_core::artifacts::{ArtifactSet, FILE_BYTES_MAX, FILES_MAX, Problem};

use crate::git::{GitError, GitSource};

/// Where the artifact set comes from (`ARTIFACTS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactsSource {
    /// A directory.
    Dir(PathBuf),
    /// A git repository and ref, checked out into a cache.
    Git(GitSource),
}

impl std::fmt::Display for ArtifactsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArtifactsSource::Dir(d) => write!(f, "{}", d.display()),
            ArtifactsSource::Git(g) => f.write_str(&g.display()),
        }
    }
}

/// A set read and checked, and where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The set.
    pub set: ArtifactSet,
    /// The directory, or `URL#ref at COMMIT`.
    pub origin: String,
    /// Set when a git fetch failed and the cached checkout was used (see [`GitSource::checkout`]).
    pub stale: Option<String>,
}

/// Why a set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The git repository could not be checked out.
    #[error("{0}")]
    Git(#[from] GitError),
    /// The set has problems; every one is listed.
    #[error("the artifact set has {} problem(s)", .0.len())]
    Problems(Vec<Problem>),
}

/// Reads and checks the set `source` names, its expressions compiled under `limits`; a git
/// source is cloned or fetched first (blocking: call it off the async runtime's workers).
pub fn load(source: &ArtifactsSource, limits: &ExprLimits) -> Result<Loaded, LoadError> {
    match source {
        ArtifactsSource::Dir(dir) => {
            let set = load_dir_with(dir, limits).map_err(LoadError::Problems)?;
            Ok(Loaded { set, origin: dir.display().to_string(), stale: None })
        }
        ArtifactsSource::Git(g) => {
            let checkout = g.checkout()?;
            let set = load_dir_with(&checkout.dir, limits).map_err(LoadError::Problems)?;
            let origin = format!("{} at {}", g.display(), &checkout.commit[..checkout.commit.len().min(12)]);
            Ok(Loaded { set, origin, stale: checkout.stale })
        }
    }
}

use crate::limits::ARTIFACT_DIR_DEPTH_MAX as DEPTH_MAX;

/// Reads and checks the set under `dir`, with the default expression limits.
pub fn load_dir(dir: &Path) -> Result<ArtifactSet, Vec<Problem>> {
    load_dir_with(dir, &ExprLimits::default())
}

/// Reads and checks the set under `dir`, its expressions compiled under `limits`.
pub fn load_dir_with(dir: &Path, limits: &ExprLimits) -> Result<ArtifactSet, Vec<Problem>> {
    let mut files = BTreeMap::new();
    let mut problems = Vec::new();
    walk(dir, dir, 0, &mut files, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    ArtifactSet::load_with(&files, limits)
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

/// A problem as `sourced check` prints it: `path:line:column: message` when the line is known
/// (a syntax error's, or where a YAML file's pointer lands, with the pointer kept after the
/// message), else `path at pointer: message`. `root` is the set's directory (a git set's
/// checkout is gone by then: its paths stay relative and only syntax errors get a line).
pub fn describe_problem(p: &sourced_core::artifacts::Problem, root: Option<&Path>) -> String {
    let path = root.map_or_else(|| p.file.clone(), |r| r.join(&p.file).display().to_string());
    let message = p.message.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((line, column)) = syntax_position(&p.location) {
        return format!("{path}:{line}:{column}: {message}");
    }
    let yaml = p.file.ends_with(".yaml") || p.file.ends_with(".yml");
    let text = root
        .filter(|_| yaml && p.location.starts_with('/'))
        .and_then(|r| std::fs::read_to_string(r.join(&p.file)).ok());
    match text.and_then(|t| sourced_core::artifacts::locate::locate(&t, &p.location)) {
        Some((line, column)) => format!("{path}:{line}:{column}: {message} (at {})", p.location),
        None if p.location.is_empty() => format!("{path}: {message}"),
        None => format!("{path} at {}: {message}", p.location),
    }
}

/// `line L column C` (how syntax errors are located) as numbers.
fn syntax_position(location: &str) -> Option<(u64, u64)> {
    let rest = location.strip_prefix("line ")?;
    let (line, column) = rest.split_once(" column ")?;
    Some((line.parse().ok()?, column.parse().ok()?))
}
