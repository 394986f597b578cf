//! Files that hold secrets: written 0600 atomically, and refused when their permissions are loose.
//!
//! Writes go to a temporary file in the same directory (created 0600 with `O_EXCL`), are synced,
//! renamed over the target and the directory is synced, so a crash leaves either the old or the
//! new file, never a torn one.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error("{path} has mode {mode:04o}: it holds secrets and must not be accessible by other users (run: chmod {want:o} {path})")]
    TooOpen { path: String, mode: u32, want: u32 },
    #[error("{path} is owned by uid {owner}, not by the user running ZeroSpice (uid {me})")]
    WrongOwner { path: String, owner: u32, me: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The uid this process runs as (the owner of `/proc/self`).
pub fn current_uid() -> io::Result<u32> {
    Ok(fs::metadata("/proc/self")?.uid())
}

fn check_mode(path: &Path, want: u32) -> Result<(), PermError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|source| PermError::Io {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PermError::TooOpen {
            path: shown,
            mode,
            want,
        });
    }
    let me = current_uid().map_err(|source| PermError::Io {
        path: "/proc/self".into(),
        source,
    })?;
    if meta.uid() != me {
        return Err(PermError::WrongOwner {
            path: shown,
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// A secret file must be 0600 (or stricter) and owned by us.
pub fn check_private_file(path: &Path) -> Result<(), PermError> {
    check_mode(path, 0o600)
}

/// A state directory must be 0700 (or stricter) and owned by us.
pub fn check_private_dir(path: &Path) -> Result<(), PermError> {
    check_mode(path, 0o700)
}

/// Creates `path` (and parents) and sets it to 0700.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// Atomically writes a file readable only by its owner (0600).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Atomically writes a file that is not secret (0644: certificates, configuration templates).
pub fn write_public(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o644)
}

/// Creates an empty file with the given mode if it does not exist (so a library that opens it
/// later, such as SQLite, inherits the mode).
pub fn touch_private(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = temp_name(dir, name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let mut rnd = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let mut n = std::ffi::OsString::from(".");
    n.push(name);
    n.push(format!(".{}.tmp", hex::encode(rnd)));
    dir.join(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_loose_ones_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        write_private(&p, b"secret").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        check_private_file(&p).unwrap();
        write_private(&p, b"secret2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret2");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_private_file(&p).unwrap_err().to_string();
        assert!(err.contains("has mode 0644"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dirs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        create_private_dir(&p).unwrap();
        check_private_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private_dir(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 700"));
    }

    #[test]
    fn touch_keeps_existing_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db");
        touch_private(&p).unwrap();
        fs::write(&p, b"x").unwrap();
        touch_private(&p).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"x");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    }
}
