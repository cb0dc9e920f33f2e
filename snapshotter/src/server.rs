//! Serving: the unix socket, signals, and an orderly stop.
//!
//! A socket file left by a crashed daemon is replaced; a socket someone still answers on
//! is an error (two daemons on one socket would split containerd's requests). On SIGTERM
//! or SIGINT the server stops accepting, lets in-flight requests finish for at most
//! [`DRAIN_TIMEOUT`], flushes the index and returns, well inside the 10 s a service
//! manager waits before SIGKILL.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::service::CasSnapshotter;

/// How long in-flight requests may run after a stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process answers on the socket.
    #[error("{0} is in use by a running process; refusing to replace it")]
    InUse(String),
    /// Creating, replacing or binding the socket failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn socket_err(path: &Path) -> impl FnOnce(io::Error) -> ServeError + '_ {
    move |source| ServeError::Socket {
        path: path.display().to_string(),
        source,
    }
}

/// Binds `address` for containerd (mode 0660), creating its directory and replacing a
/// stale socket file.
pub fn bind(address: &Path) -> Result<UnixListener, ServeError> {
    let listener = bind_socket(address)?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
        .map_err(socket_err(address))?;
    Ok(listener)
}

/// Binds a unix socket at `address`, creating its directory and replacing a stale
/// socket file; refuses a socket someone still answers on.
pub fn bind_socket(address: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(socket_err(address))?;
    }
    match std::fs::symlink_metadata(address) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(address).is_ok() {
                return Err(ServeError::InUse(address.display().to_string()));
            }
            warn!(socket = %address.display(), "replacing stale socket");
            std::fs::remove_file(address).map_err(socket_err(address))?;
        }
        Ok(_) => {
            return Err(ServeError::Socket {
                path: address.display().to_string(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(address)(e)),
    }
    UnixListener::bind(address).map_err(socket_err(address))
}

/// SIGTERM and SIGINT, caught from before the socket exists: a stop that comes as soon
/// as the socket appears is an orderly stop too.
pub struct StopSignals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl StopSignals {
    /// Installs the handlers (inside the runtime).
    pub fn install() -> StopSignals {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => StopSignals(Some((term, int))),
            _ => {
                warn!("cannot install signal handlers; stop with SIGKILL");
                StopSignals(None)
            }
        }
    }

    /// Waits for SIGTERM or SIGINT.
    async fn wait(&mut self) {
        let Some((term, int)) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, stopping"),
            _ = int.recv() => info!("SIGINT received, stopping"),
        }
    }
}

/// Serves the Snapshots and Diff APIs on `listener` and the admin socket on `admin`
/// until a stop signal (`stop`).
pub async fn serve(
    snapshotter: Arc<CasSnapshotter>,
    differ: crate::diff::CasDiffer,
    listener: UnixListener,
    address: &Path,
    admin: UnixListener,
    mut stop: StopSignals,
) -> Result<(), ServeError> {
    let admin_path = snapshotter.layout().admin_socket();
    let admin_task = tokio::spawn(crate::admin::serve(snapshotter.clone(), admin));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(crate::metrics::RequestTimerLayer(
            snapshotter.metrics().clone(),
        ))
        .add_service(containerd_snapshots::server(snapshotter))
        .add_service(crate::diff::server(differ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = std::pin::pin!(server);
    tokio::select! {
        res = &mut server => { res?; }
        _ = stop.wait() => {
            let _ = stop_tx.send(());
            if tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await.is_err() {
                warn!("requests still running after {:?}; stopping anyway", DRAIN_TIMEOUT);
            }
        }
    }
    admin_task.abort();
    let _ = std::fs::remove_file(address);
    let _ = std::fs::remove_file(admin_path);
    Ok(())
}
