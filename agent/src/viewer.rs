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
