//! Just enough QMP to do what qemu-server's spiceproxy call does to a running VM:
//! `set_password {protocol: spice}` then `expire_password {time: "+30"}`.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug)]
pub struct QmpError {
    pub command: String,
    pub message: String,
}

impl QmpError {
    pub fn new(command: &str, message: impl Into<String>) -> Self {
        QmpError {
            command: command.to_owned(),
            message: message.into(),
        }
    }
}

/// Sets the one-time SPICE password and lets it expire in 30 s. Callers bound the time.
pub async fn set_spice_password(socket: &Path, password: &str) -> Result<(), QmpError> {
    let (mut r, mut w) = open(socket).await?;
    execute(
        &mut r,
        &mut w,
        "set_password",
        Some(json!({ "protocol": "spice", "password": password })),
    )
    .await?;
    execute(
        &mut r,
        &mut w,
        "expire_password",
        Some(json!({ "protocol": "spice", "time": "+30" })),
    )
    .await?;
    Ok(())
}

/// Runs one QMP command on a fresh connection and returns its `return` value (the harness uses
/// it for `screendump`). Callers bound the time.
pub async fn command(
    socket: &Path,
    name: &str,
    arguments: Option<Value>,
) -> Result<Value, QmpError> {
    let (mut r, mut w) = open(socket).await?;
    execute(&mut r, &mut w, name, arguments).await
}

/// Connects, reads the greeting and leaves the capabilities negotiation done.
async fn open(socket: &Path) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), QmpError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| QmpError::new("connect", e.to_string()))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = read_message(&mut r)
        .await
        .map_err(|e| QmpError::new("greeting", e))?;
    if greeting.get("QMP").is_none() {
        return Err(QmpError::new("greeting", "not a QMP greeting"));
    }
    execute(&mut r, &mut w, "qmp_capabilities", None).await?;
    Ok((r, w))
}

async fn execute(
    r: &mut BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, QmpError> {
    let msg = match arguments {
        Some(arguments) => json!({ "execute": command, "arguments": arguments }),
        None => json!({ "execute": command }),
    };
    w.write_all(format!("{msg}\r\n").as_bytes())
        .await
        .map_err(|e| QmpError::new(command, e.to_string()))?;
    let reply = read_message(r)
        .await
        .map_err(|e| QmpError::new(command, e))?;
    if let Some(err) = reply.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(QmpError::new(command, desc));
    }
    reply
        .get("return")
        .cloned()
        .ok_or_else(|| QmpError::new(command, "reply without 'return'"))
}

/// The next non-event message.
async fn read_message(r: &mut BufReader<OwnedReadHalf>) -> Result<Value, String> {
    loop {
        let mut line = String::new();
        let n = (&mut *r)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}
