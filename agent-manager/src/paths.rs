//! Which host directories an agent may be given (its workdir, mounted read-write at
//! `/workspace`, and the sources of its mounts), and who it runs as.
//!
//! A host path is resolved first (symlinks followed, `..` gone): the canonical path is
//! what is checked, stored and mounted. It must be an existing directory, must not be `/`,
//! must be neither inside nor above a protected path (the system trees of
//! [`SYSTEM_TREES`], and what the daemon adds: its engine's socket directory, its own data
//! directory, its credential files), and must be inside one of `agents.workdir_roots`
//! when that list is set.

use std::io;
use std::path::{Path, PathBuf};

use crate::ManagerError;

/// Host trees no agent is ever given, nor any directory above them.
pub const SYSTEM_TREES: &[&str] =
    &["/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/var/run", "/var/lib/docker", "/var/lib/containers"];

/// A host path no agent may be given, nor anything under it or above it, with what it
/// is in words ("the docker engine's socket directory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedPath {
    pub path: PathBuf,
    pub what: String,
}

impl ProtectedPath {
    pub fn new(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Self { path: path.into(), what: what.into() }
    }
}

/// The refusal of host path `value` in `field`, with the rule it breaks.
fn refused(field: &'static str, value: &Path, rule: String) -> ManagerError {
    ManagerError::Refused { field, value: value.display().to_string(), rule }
}

/// The forms of `path` a resolved path is compared with: as written and, where it exists,
/// resolved (`/var/run` is `/run` on most hosts).
fn forms(path: &Path) -> Vec<PathBuf> {
    let mut forms = vec![path.to_path_buf()];
    if let Ok(resolved) = std::fs::canonicalize(path) {
        if resolved != path {
            forms.push(resolved);
        }
    }
    forms
}

/// Resolves `path` (the value of `field`) and checks it against the rules; returns the
/// canonical path, which is what gets mounted and stored. Blocking (file-system calls).
pub fn check_host_dir(
    field: &'static str,
    path: &Path,
    protected: &[ProtectedPath],
    roots: &[PathBuf],
) -> Result<PathBuf, ManagerError> {
    if !path.is_absolute() {
        return Err(refused(field, path, "must be an absolute path on the agentd host".into()));
    }
    let resolved = match std::fs::canonicalize(path) {
        Ok(resolved) => resolved,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refused(
                field,
                path,
                "must be an existing directory on the agentd host; create it first".into(),
            ))
        }
        Err(e) => return Err(refused(field, path, format!("cannot be resolved on the agentd host: {e}"))),
    };
    // What the rule says about the path: it, or what it resolves to.
    let shown =
        if resolved == path { "it".to_owned() } else { format!("it resolves to {}, which", resolved.display()) };
    if !resolved.is_dir() {
        return Err(refused(field, path, format!("{shown} is not a directory; only directories are given to agents")));
    }
    if resolved == Path::new("/") {
        return Err(refused(
            field,
            path,
            format!("{shown} is the host's root directory, which is never given to an agent"),
        ));
    }
    let system = SYSTEM_TREES.iter().map(|tree| ProtectedPath::new(*tree, "a system directory"));
    let all: Vec<ProtectedPath> = system.chain(protected.iter().cloned()).collect();
    for p in &all {
        if forms(&p.path).iter().any(|form| resolved.starts_with(form)) {
            return Err(refused(
                field,
                path,
                format!(
                    "{shown} is inside {}, {}: nothing inside it or above it is given to an agent",
                    p.path.display(),
                    p.what
                ),
            ));
        }
    }
    for p in &all {
        if forms(&p.path).iter().any(|form| form.starts_with(&resolved)) {
            return Err(refused(
                field,
                path,
                format!(
                    "{shown} contains {}, {}: a directory above a protected path is never given to an agent",
                    p.path.display(),
                    p.what
                ),
            ));
        }
    }
    if !roots.is_empty() && !roots.iter().any(|root| forms(root).iter().any(|form| resolved.starts_with(form))) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(refused(
            field,
            path,
            format!(
                "{shown} is outside agents.workdir_roots ({}); use a directory inside one of them",
                list.join(", ")
            ),
        ));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(e: ManagerError) -> String {
        match e {
            ManagerError::Refused { rule, .. } => rule,
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn system_trees_their_insides_and_their_parents_are_refused() {
        for (path, expect) in [
            ("/", "root directory"),
            ("/etc", "inside /etc, a system directory"),
            ("/etc/ssl", "inside /etc, a system directory"),
            ("/proc/self", "a system directory"),
            ("/sys", "inside /sys"),
            ("/dev", "inside /dev"),
            ("/run", "inside /run"),
            ("/var", "contains /var/run, a system directory"),
            ("relative", "absolute path"),
            ("/nonexistent-agentd-dir", "existing directory"),
        ] {
            let got = rule(check_host_dir("workdir", Path::new(path), &[], &[]).expect_err(path));
            assert!(got.contains(expect), "{path}: {got}");
        }
    }
}
