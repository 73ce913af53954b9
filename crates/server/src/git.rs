//! Artifact sets from git (SPEC §3.4): `ARTIFACTS=URL#ref` is cloned, or fetched when already
//! cached, into a cache directory and the ref checked out (detached); the set is then read from
//! that working tree like any directory. Runs the machine's `git` (no git library: gix costs
//! ~300 crates of build, git2 needs OpenSSL headers), never interactively, each step bounded
//! by a timeout.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A git repository holding an artifact set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSource {
    /// The repository's URL as given (without the `#ref`).
    pub url: String,
    /// A branch, tag or commit; the remote's default branch when `None`.
    pub reference: Option<String>,
    /// The cache directory (`ARTIFACTS_CACHE`); the clone lives in a subdirectory of it.
    pub cache: PathBuf,
    /// Longest time one git command may take.
    pub timeout: Duration,
}

/// The working tree checked out, ready to be read.
#[derive(Debug)]
pub struct Checkout {
    /// The working tree.
    pub dir: PathBuf,
    /// The commit checked out (full hash).
    pub commit: String,
    /// Set when the fetch failed and the cached copy of the ref was used instead.
    pub stale: Option<String>,
    /// An exclusive lock on the cache directory, held until the checkout is dropped: another
    /// process (or thread) that shares the cache waits, so it never fetches, checks out or
    /// cleans the working tree while this one clones it or reads the set from it.
    _lock: std::fs::File,
}

/// Why a git source could not be checked out. Every message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitError {
    /// `git` could not be run at all.
    #[error("cannot run git: {0}")]
    Spawn(String),
    /// A git command failed; `message` is git's own (its stderr, on one line).
    #[error("git {step} failed: {message}")]
    Failed {
        /// `clone`, `fetch`, `checkout`…
        step: &'static str,
        /// What git said.
        message: String,
    },
    /// A git command outlived the timeout and was killed.
    #[error("git {step} did not finish within {secs} s (killed)")]
    Timeout {
        /// The step.
        step: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The ref names nothing in the repository.
    #[error("no branch, tag or commit named '{0}' in the repository")]
    UnknownRef(String),
    /// The cache directory could not be prepared.
    #[error("cache directory {path}: {message}")]
    Cache {
        /// The directory.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Whether an `ARTIFACTS` value is a git URL rather than a directory.
pub fn is_git_url(s: &str) -> bool {
    ["file://", "https://", "http://", "ssh://", "git://"].iter().any(|p| s.starts_with(p))
        || (s.starts_with("git@") && s.contains(':'))
}

/// Splits `URL#ref` and checks both parts; the error is a reason for a person.
pub fn parse_url(s: &str) -> Result<(String, Option<String>), String> {
    let (url, reference) = match s.rsplit_once('#') {
        Some((u, r)) => (u, Some(r)),
        None => (s, None),
    };
    if url.starts_with('-') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the git URL may not start with '-' or contain spaces".to_owned());
    }
    let reference = match reference {
        None => None,
        Some("") => return Err("the ref after '#' is empty; give a branch, tag or commit".to_owned()),
        Some(r) if !valid_ref(r) => {
            return Err(format!("'{r}' is not a valid git ref (letters, digits, / . _ -, not starting with - or /)"));
        }
        Some(r) => Some(r.to_owned()),
    };
    Ok((url.to_owned(), reference))
}

fn valid_ref(r: &str) -> bool {
    r.len() <= 255
        && !r.starts_with(['-', '/', '.'])
        && !r.ends_with(['/', '.'])
        && !r.contains("..")
        && !r.contains("//")
        && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

impl GitSource {
    /// `URL#ref` as given.
    pub fn display(&self) -> String {
        match &self.reference {
            Some(r) => format!("{}#{r}", self.url),
            None => self.url.clone(),
        }
    }

    /// The clone's directory: one per `URL#ref`, named by a hash of it, so two refs of one
    /// repository never share a working tree.
    pub fn clone_dir(&self) -> PathBuf {
        let hash = Sha256::digest(self.display().as_bytes());
        let name: String = hash.iter().take(12).map(|b| format!("{b:02x}")).collect();
        self.cache.join(name)
    }

    /// Clones or fetches, then checks the ref out. When the fetch of an existing clone fails
    /// but the ref can be resolved in the cached copy, that copy is checked out and
    /// [`Checkout::stale`] says why: a git host that is down must not keep a service from
    /// starting with the set it ran before. A first clone that fails is an error.
    pub fn checkout(&self) -> Result<Checkout, GitError> {
        let lock = self.lock_cache()?;
        let dir = self.clone_dir();
        let fetch_failed = if dir.join(".git").is_dir() {
            self.fetch(&dir).err()
        } else {
            self.clone_into(&dir)?;
            None
        };
        let commit = match self.resolve(&dir) {
            Ok(c) => c,
            // The fetch's failure explains a missing ref better than the lookup does.
            Err(e) => return Err(fetch_failed.unwrap_or(e)),
        };
        self.git(
            &dir,
            "checkout",
            &["-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", "--detach", &commit],
        )?;
        // Files left behind by an earlier checkout are not part of this commit's set.
        self.git(&dir, "clean", &["clean", "-ffdxq"])?;
        Ok(Checkout { dir, commit, stale: fetch_failed.map(|e| e.to_string()), _lock: lock })
    }

    /// Creates the cache directory if needed and takes an exclusive lock on it (`flock` on
    /// the directory itself, so no lock file is left behind), waiting for whoever holds it.
    fn lock_cache(&self) -> Result<std::fs::File, GitError> {
        std::fs::create_dir_all(&self.cache).map_err(|e| self.cache_error(e))?;
        let dir = std::fs::File::open(&self.cache).map_err(|e| self.cache_error(e))?;
        dir.lock().map_err(|e| self.cache_error(e))?;
        Ok(dir)
    }

    fn cache_error(&self, e: std::io::Error) -> GitError {
        GitError::Cache { path: self.cache.display().to_string(), message: e.to_string() }
    }

    /// Clones into `dir`, in the cache directory that [`Self::lock_cache`] made.
    fn clone_into(&self, dir: &Path) -> Result<(), GitError> {
        // Clone beside the final name, then rename: a failed clone leaves nothing half-made.
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let tmp_s = tmp.to_string_lossy().into_owned();
        let cloned = self.git(&self.cache, "clone", &["clone", "--quiet", "--no-checkout", "--", &self.url, &tmp_s]);
        if let Err(e) = cloned {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| self.cache_error(e))
    }

    fn fetch(&self, dir: &Path) -> Result<(), GitError> {
        // The remote's URL is set again: the cache is keyed by it, but a clone made by another
        // version could differ in form.
        self.git(dir, "fetch", &["remote", "set-url", "origin", "--", &self.url])?;
        self.git(
            dir,
            "fetch",
            &["fetch", "--quiet", "--prune", "--force", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"],
        )?;
        if self.reference.is_none() {
            self.git(dir, "fetch", &["remote", "set-head", "origin", "--auto"])?;
        }
        Ok(())
    }

    /// The commit the ref names: a branch of the remote, a tag, or a commit hash.
    fn resolve(&self, dir: &Path) -> Result<String, GitError> {
        let candidates: Vec<String> = match &self.reference {
            None => vec!["refs/remotes/origin/HEAD".to_owned()],
            Some(r) => vec![format!("refs/remotes/origin/{r}"), format!("refs/tags/{r}"), r.clone()],
        };
        for c in &candidates {
            let spec = format!("{c}^{{commit}}");
            if let Ok(out) =
                self.git(dir, "rev-parse", &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec])
            {
                let hash = out.trim();
                if !hash.is_empty() {
                    return Ok(hash.to_owned());
                }
            }
        }
        Err(GitError::UnknownRef(self.reference.clone().unwrap_or_else(|| "HEAD".to_owned())))
    }

    /// Runs one git command in `dir` and returns its stdout.
    fn git(&self, dir: &Path, step: &'static str, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Never ask for a password or a host key: fail instead.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "")
            .env("SSH_ASKPASS", "")
            .env("LC_ALL", "C");
        if std::env::var_os("GIT_SSH_COMMAND").is_none() {
            cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        // Its own process group, so a timeout also ends the helpers git starts (ssh,
        // git-remote-https), which would otherwise outlive it.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| GitError::Spawn(e.to_string()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // Read both pipes on their own threads so a chatty git never blocks on a full pipe.
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    #[cfg(unix)]
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", child.id())])
                        .stderr(Stdio::null())
                        .status();
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(GitError::Timeout { step, secs: self.timeout.as_secs() });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(GitError::Spawn(e.to_string())),
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let message = if lines.is_empty() { format!("exited with {status}") } else { lines.join("; ") };
            Err(GitError::Failed { step, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_refs() {
        for u in ["file:///tmp/r", "https://h/r.git", "ssh://git@h/r", "git@github.com:o/r.git", "git://h/r"] {
            assert!(is_git_url(u), "{u}");
        }
        for d in ["./examples/order", "/srv/artifacts", "git@nohost"] {
            assert!(!is_git_url(d), "{d}");
        }
        assert_eq!(parse_url("file:///r#v1.2").unwrap(), ("file:///r".to_owned(), Some("v1.2".to_owned())));
        assert_eq!(parse_url("https://h/r.git").unwrap(), ("https://h/r.git".to_owned(), None));
        assert_eq!(parse_url("https://h/r#feature/x").unwrap().1.as_deref(), Some("feature/x"));
        for bad in ["file:///r#", "file:///r#-x", "file:///r#a..b", "file:///r#a b", "-file:///r"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_cache_directory_per_url_and_ref() {
        let s = |r: Option<&str>| GitSource {
            url: "file:///r".into(),
            reference: r.map(str::to_owned),
            cache: PathBuf::from("/c"),
            timeout: Duration::from_secs(1),
        };
        assert_ne!(s(Some("a")).clone_dir(), s(Some("b")).clone_dir());
        assert_eq!(s(Some("a")).clone_dir(), s(Some("a")).clone_dir());
        assert!(s(None).clone_dir().starts_with("/c"));
    }
}
