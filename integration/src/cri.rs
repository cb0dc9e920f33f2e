//! A Kubernetes CRI client (`runtime.v1`, the API kubelet speaks) over containerd's unix
//! socket, for the CRI end-to-end test: no crictl is packaged for Debian, so the test
//! talks gRPC itself, as kubelet does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated `runtime.v1` messages and clients.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

pub use api::image_service_client::ImageServiceClient;
pub use api::runtime_service_client::RuntimeServiceClient;

/// Both CRI services on one connection.
#[derive(Clone)]
pub struct CriClient {
    /// Pods and containers.
    pub runtime: RuntimeServiceClient<Channel>,
    /// Images.
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI socket (containerd's gRPC socket).
    pub async fn connect(sock: &Path) -> Result<CriClient> {
        let sock: PathBuf = sock.to_path_buf();
        // The URI is a placeholder: the connector dials the unix socket.
        let channel = Endpoint::try_from("http://[::]:0")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(sock.clone())
            }))
            .await
            .context("connecting to the CRI socket")?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}
