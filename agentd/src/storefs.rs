//! The store's files on disk: private to the daemon's user, and one daemon per database.
//!
//! The store holds spawn env values and agent secrets, so its directory is created 0700
//! and the database and its `-wal`/`-shm` files are 0600 (SQLite gives `-wal` and `-shm`
//! the database file's mode, so the database is created 0600 before SQLite opens it; all
//! three are checked again after it did). An existing file with group or other bits is
//! tightened with a warning naming it; so is an existing directory, unless it is not
//! agentd's to change (not owned by the daemon's user, sticky like `/tmp`, or `$HOME`),
//! which is left as it is with a warning.
//!
//! [`lock`] takes an exclusive `flock` on `<database>.lock`, which holds the pid of the
//! daemon holding it, for as long as the daemon runs.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::warn;

/// The path with `suffix` appended to its file name (`agentd.db` → `agentd.db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates the database's directory 0700 (tightening an existing one of agentd's), takes
/// the database's [`lock`], creates the database file 0600 if it is missing, and tightens
/// the database, `-wal` and `-shm` files.
pub fn prepare(db: &Path) -> Result<StoreLock> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    let lock = lock(db)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(db)
        .with_context(|| format!("creating the database file {}", db.display()))?;
    tighten_files(db)?;
    Ok(lock)
}

/// Tightens the database, `-wal` and `-shm` files that exist to 0600, each with a warning.
pub fn tighten_files(db: &Path) -> Result<()> {
    for file in [db.to_path_buf(), with_suffix(db, "-wal"), with_suffix(db, "-shm")] {
        let meta = match std::fs::metadata(&file) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the mode of {}", file.display())),
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private (chmod 0600)", file.display()))?;
            warn!(
                file = %file.display(),
                mode = format!("{mode:04o}"),
                "A store file was readable by other users; tightened to 0600 (it holds env values and agent secrets)."
            );
        }
    }
    Ok(())
}

fn prepare_dir(dir: &Path) -> Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating the data directory {}", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("reading the data directory {}", dir.display())),
    };
    if !meta.is_dir() {
        bail!("{} is not a directory; store.path must name a file in a directory", dir.display());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let ours = meta.uid() == rustix::process::geteuid().as_raw()
        && mode & 0o1000 == 0
        && home.as_deref().and_then(|h| h.canonicalize().ok()) != dir.canonicalize().ok();
    if ours {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700))
            .with_context(|| format!("making the data directory {} private (chmod 0700)", dir.display()))?;
        warn!(
            directory = %dir.display(),
            mode = format!("{mode:04o}"),
            "The store's directory was open to other users; tightened to 0700."
        );
    } else {
        warn!(
            directory = %dir.display(),
            mode = format!("{mode:04o}"),
            "The store's directory is open to other users and is not agentd's own (another owner, sticky, or $HOME); left as it is, the database files themselves are 0600."
        );
    }
    Ok(())
}

/// The exclusive lock on a database, held while this value lives.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
    path: PathBuf,
}

impl StoreLock {
    /// The lock file, `<database>.lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the exclusive lock on `db` (a `flock` on `<db>.lock`, created 0600) and writes this
/// process's pid into the lock file. Another daemon holding it is an error naming its pid
/// and the database.
pub fn lock(db: &Path) -> Result<StoreLock> {
    let path = with_suffix(db, ".lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            let who = if pid.is_empty() { "another agentd".to_owned() } else { format!("another agentd (pid {pid})") };
            bail!(
                "the database {} is in use by {who}, which holds its lock {}; stop that daemon first, \
                 or give this one a database of its own (store.path)",
                db.display(),
                path.display()
            );
        }
        Err(e) => bail!("cannot lock {}: {e}", path.display()),
    }
    file.set_len(0).and_then(|()| file.rewind()).with_context(|| format!("truncating {}", path.display()))?;
    writeln!(file, "{}", std::process::id()).with_context(|| format!("writing the pid into {}", path.display()))?;
    file.sync_all().with_context(|| format!("writing the pid into {}", path.display()))?;
    Ok(StoreLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agentd-storefs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").mode() & 0o777
    }

    #[test]
    fn a_new_store_is_private_and_a_loose_one_is_tightened() {
        let dir = scratch("modes");
        let db = dir.join("nested/agentd.db");
        drop(prepare(&db).expect("prepare"));
        assert_eq!(mode(db.parent().expect("dir")), 0o700);
        assert_eq!(mode(&db), 0o600);
        std::fs::set_permissions(db.parent().expect("dir"), Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&db, Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(with_suffix(&db, "-wal"), b"").expect("wal");
        std::fs::set_permissions(with_suffix(&db, "-wal"), Permissions::from_mode(0o644)).expect("chmod");
        let _lock = prepare(&db).expect("prepare again");
        assert_eq!(mode(db.parent().expect("dir")), 0o700);
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&with_suffix(&db, "-wal")), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_lock_names_the_holders_pid() {
        let dir = scratch("lock");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let db = dir.join("agentd.db");
        let held = lock(&db).expect("first lock");
        let text = std::fs::read_to_string(held.path()).expect("lock file");
        assert_eq!(text.trim(), std::process::id().to_string());
        let err = format!("{:#}", lock(&db).expect_err("a second lock must fail"));
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains(&db.display().to_string()),
            "{err}"
        );
        drop(held);
        lock(&db).expect("the lock is free again once its holder is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
