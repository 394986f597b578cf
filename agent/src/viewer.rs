//! Starting remote-viewer with the connection file on its standard input.
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// The viewer to start: `$ZEROSPICE_VIEWER`, else `remote-viewer` from `PATH`.
pub fn default_viewer() -> PathBuf {
    std::env::var_os("ZEROSPICE_VIEWER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("remote-viewer"))
}

/// Starts `viewer -` and writes `vv` to its standard input, then closes it: the one-time
/// password never touches the disk. The child is killed if the handle is dropped.
pub async fn launch(viewer: &Path, vv: &str) -> std::io::Result<Child> {
    let mut child = Command::new(viewer)
        .arg("-")
        // The YubiKey PIN may have come from the environment: it is not the viewer's business,
        // and a child's environment is readable in /proc and lands in crash reports.
        .env_remove(zerospice_enroll::hardware::PIN_ENV)
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot start {}: {e} (install virt-viewer, or pass --viewer PATH)",
                    viewer.display()
                ),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(vv.as_bytes()).await?;
        stdin.shutdown().await?;
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_viewer_does_not_inherit_the_yubikey_pin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        // `sh -` runs its standard input: the "connection file" here is a script that records
        // what the child sees.
        let script = format!(
            "printf '%s' \"${{{}-unset}}/${{HOME-nohome}}\" > {}\n",
            zerospice_enroll::hardware::PIN_ENV,
            out.display()
        );
        std::env::set_var(zerospice_enroll::hardware::PIN_ENV, "123456");
        let mut child = launch(Path::new("/bin/sh"), &script).await.unwrap();
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        std::env::remove_var(zerospice_enroll::hardware::PIN_ENV);
        assert!(status.success());
        let seen = std::fs::read_to_string(&out).unwrap();
        assert!(seen.starts_with("unset/"), "{seen}");
        assert!(
            !seen.ends_with("/nohome"),
            "the rest of the environment is kept: {seen}"
        );
    }
}
