//! The admin socket (`<root>/admin.sock`): how `casctl` reaches a running daemon.
//!
//! One JSON request line, one JSON answer line (`cas::admin::AdminRequest` /
//! `AdminResponse`), after `AdminResponse::Progress` lines for a long request (fsck).
//! Requests run inside the daemon under its locks: GC and fsck wait for running ingests
//! and hold new ones off, so they are safe against concurrent pulls and removes. The
//! socket is root-only (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use cas::admin::{AdminRequest, AdminResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::server::{bind_socket, ServeError};
use crate::service::CasSnapshotter;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Binds the admin socket of `sn`'s store.
pub fn bind(sn: &CasSnapshotter) -> Result<UnixListener, ServeError> {
    let path = sn.layout().admin_socket();
    let listener = bind_socket(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServeError::Socket {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves admin requests until the task is dropped.
pub async fn serve(sn: Arc<CasSnapshotter>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let sn = sn.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(sn, conn).await {
                        debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(sn: Arc<CasSnapshotter>, conn: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_REQUEST)
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<AdminRequest>(&line) {
        Err(e) => AdminResponse::Error(format!("bad request: {e}")),
        Ok(AdminRequest::Stats) => sn
            .stats()
            .await
            .map(|s| AdminResponse::Stats(Box::new(s)))
            .unwrap_or_else(|e| AdminResponse::Error(e.to_string())),
        Ok(AdminRequest::Fsck { verify_objects }) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let check = {
                let sn = sn.clone();
                tokio::spawn(async move { sn.fsck_with_progress(verify_objects, tx).await })
            };
            // the channel closes when the check ends
            while let Some(p) = rx.recv().await {
                write
                    .write_all(&line_of(&AdminResponse::Progress(p)))
                    .await?;
            }
            match check.await {
                Ok(r) => r
                    .map(AdminResponse::Fsck)
                    .unwrap_or_else(|e| AdminResponse::Error(e.to_string())),
                Err(e) => AdminResponse::Error(format!("fsck task failed: {e}")),
            }
        }
        Ok(AdminRequest::Images) => sn
            .chain_usage()
            .await
            .map(AdminResponse::Images)
            .unwrap_or_else(|e| AdminResponse::Error(e.to_string())),
        Ok(AdminRequest::Gc) => sn
            .gc()
            .await
            .map(AdminResponse::Gc)
            .unwrap_or_else(|e| AdminResponse::Error(e.to_string())),
    };
    write.write_all(&line_of(&resp)).await
}

/// One answer line.
fn line_of(resp: &AdminResponse) -> Vec<u8> {
    let mut out = serde_json::to_vec(resp).unwrap_or_default();
    out.push(b'\n');
    out
}
