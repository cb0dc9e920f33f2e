//! The Diff service (`cas-diff`): containerd's `Apply` on our own mounts, in one pass.
//!
//! containerd (>= 1.7.4) loads it as a second proxy plugin on the Snapshots socket,
//! `[proxy_plugins.cas-diff] type = "diff"`. During an unpack it Prepares an active
//! snapshot, calls `Apply(descriptor, mounts)` and then Commits the snapshot. Where the
//! mounts are one of our active snapshots (a bind of, or an overlay whose upper is,
//! `snapshots/<id>/fs`), the layer blob is read from containerd's content store and
//! unpacked straight into stubs, objects and a manifest ([`cas::unpack`]); Commit then
//! has nothing left to ingest. The reply carries the digest of the uncompressed tar,
//! which containerd checks against the image's diffID.
//!
//! ## Blobs
//! The blob is read from `[differ] content_dir` (`blobs/sha256/<hex>`, with the I/O
//! pool's fixed-buffer reads) when it is there, otherwise streamed through containerd's
//! Content API on `[differ] containerd_address`, in the namespace of the request.
//!
//! ## When containerd's own applier must do it
//! Everything this service cannot apply is answered `Unimplemented`, which containerd's
//! diff service (1.7's default path, and `ctr pull --local` on 2.x) takes as "try the next
//! differ" (`default = ["cas-diff", "walking"]`): mounts that are not our active snapshots,
//! media types other than plain/gzip/zstd tar layers (encrypted ones, for instance),
//! requests with stream-processor payloads, a materialised store, a blob neither
//! readable nor streamable, or `[differ] enabled = false`. containerd 2.x's transfer
//! service, when its `unpack_config` names `cas-diff`, has no such fallback: there every
//! one of these is a failed pull, so name `cas-diff` only for the `cas` snapshotter.
//!
//! `Diff` (making a diff between two mounts, e.g. `ctr snapshots diff` or commits of
//! containers into images) answers `Unimplemented`: containerd's walking differ does it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cas::unpack::{ChunkReader, Limits};
use cas::Digest;
use config::DifferConfig;
use containerd_snapshots::api::types::Mount;
use oci_spec::image::MediaType;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::error::ServiceError;
use crate::metrics::BlobSource;
use crate::service::CasSnapshotter;

/// Code generated from the vendored containerd protos (see `proto/README.md`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `containerd.types` (the `Mount` type is `containerd-snapshots`' own).
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services`.
        pub mod services {
            /// `containerd.services.diff`.
            pub mod diff {
                /// `containerd.services.diff.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
            /// `containerd.services.content`.
            pub mod content {
                /// `containerd.services.content.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
        }
    }
}

use proto::containerd::services::content::v1::{content_client::ContentClient, ReadContentRequest};
use proto::containerd::services::diff::v1::diff_server::{Diff, DiffServer};
use proto::containerd::services::diff::v1::{
    ApplyRequest, ApplyResponse, DiffRequest, DiffResponse,
};
use proto::containerd::types::Descriptor;

/// gRPC metadata key containerd puts the namespace in.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Chunks of a streamed blob buffered between the Content API and the unpack.
const STREAM_CHUNKS: usize = 16;

/// Where containerd's content store keeps blobs, under `[differ] content_dir`.
const CONTENT_BLOBS: &str = "blobs/sha256";

/// Docker's layer media types (image manifest v2, schema 2), which `oci-spec` does not
/// name; containerd's applier takes them as tar layers too.
const DOCKER_LAYERS: [&str; 4] = [
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Whether `media_type` is a layer this service unpacks: OCI and Docker tar layers,
/// plain, gzip or zstd (the compression itself is told from the blob's first bytes).
/// Anything else (encrypted layers, artifacts) is containerd's applier's.
pub fn is_layer_media_type(media_type: &str) -> bool {
    // the non-distributable types are deprecated by the image spec, but images have them
    #[allow(deprecated)]
    let oci = matches!(
        MediaType::from(media_type),
        MediaType::ImageLayer
            | MediaType::ImageLayerGzip
            | MediaType::ImageLayerZstd
            | MediaType::ImageLayerNonDistributable
            | MediaType::ImageLayerNonDistributableGzip
            | MediaType::ImageLayerNonDistributableZstd
    );
    oci || DOCKER_LAYERS.contains(&media_type)
}

/// The layer directory (`…/snapshots/<id>/fs`) a mount list writes into: the source of
/// a single bind mount, or the `upperdir` of a single overlay mount.
pub fn layer_dir_of(mounts: &[Mount]) -> Option<PathBuf> {
    let [m] = mounts else {
        return None;
    };
    let bind = m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
    if bind {
        return Some(PathBuf::from(&m.source));
    }
    if m.r#type == "overlay" {
        return m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from);
    }
    None
}

/// Whether the Diff service can reach layer blobs, which it needs to apply anything:
/// containerd's content directory (`[differ] content_dir`), or else its Content API
/// (`[differ] containerd_address`). A containerd whose root or socket are not the
/// defaults needs both keys set; without either, every layer is handed back and
/// ingested at Commit, a slower path that still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobReach {
    /// `<content_dir>/blobs/sha256` is a directory.
    pub content_dir: bool,
    /// `containerd_address` accepts a connection.
    pub content_api: bool,
}

impl BlobReach {
    /// Looks now (containerd may start after the daemon: the answer can change).
    pub fn check(cfg: &DifferConfig) -> BlobReach {
        BlobReach {
            content_dir: cfg.content_dir.join(CONTENT_BLOBS).is_dir(),
            content_api: std::os::unix::net::UnixStream::connect(&cfg.containerd_address).is_ok(),
        }
    }

    /// One line for the log and `casctl stats`: where blobs come from, or why none can.
    pub fn describe(&self, cfg: &DifferConfig) -> String {
        let (dir, sock) = (cfg.content_dir.display(), cfg.containerd_address.display());
        match (self.content_dir, self.content_api) {
            (true, _) => format!("containerd's content directory {dir}"),
            (false, true) => format!(
                "containerd's Content API at {sock} ([differ] content_dir {dir} has no blobs/sha256)"
            ),
            (false, false) => format!(
                "unreachable: [differ] content_dir {dir} has no blobs/sha256 and [differ] \
                 containerd_address {sock} does not answer; every layer is handed back to \
                 containerd's applier and ingested at Commit (slower): set both keys to \
                 containerd's root and socket"
            ),
        }
    }

    /// Whether some way to the blobs works.
    pub fn reachable(&self) -> bool {
        self.content_dir || self.content_api
    }
}

/// The Diff service.
pub struct CasDiffer {
    sn: Arc<CasSnapshotter>,
    cfg: DifferConfig,
    pool: ringio::Pool,
    /// Whether a blob nowhere to be found was logged as a warning already.
    warned: AtomicBool,
}

impl CasDiffer {
    /// A differ applying into `sn`'s active snapshots with `pool`'s workers.
    pub fn new(sn: Arc<CasSnapshotter>, cfg: DifferConfig, pool: ringio::Pool) -> CasDiffer {
        sn.attach_differ(cfg.clone());
        CasDiffer {
            sn,
            cfg,
            pool,
            warned: AtomicBool::new(false),
        }
    }

    /// Says in the log where layer blobs will come from, loudly when from nowhere
    /// (at start; again at the first apply that finds no blob).
    pub fn report_blob_reach(&self) {
        if !self.cfg.enabled {
            info!(
                "the Diff service is off ([differ] enabled = false): layers are ingested at Commit"
            );
            return;
        }
        let reach = BlobReach::check(&self.cfg);
        if reach.reachable() {
            info!(source = %reach.describe(&self.cfg), "the Diff service reads layer blobs from");
        } else {
            warn!(
                "the Diff service cannot reach layer blobs: {}",
                reach.describe(&self.cfg)
            );
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.cfg.max_layer_bytes,
            max_ratio: self.cfg.max_expansion,
            ..Limits::default()
        }
    }

    async fn apply_request(
        &self,
        req: ApplyRequest,
        namespace: Option<String>,
    ) -> Result<Descriptor, ServiceError> {
        let not = |why: String| Err(ServiceError::NotApplicable(why));
        if !self.cfg.enabled {
            return not("the differ is disabled ([differ] enabled = false)".into());
        }
        let Some(desc) = req.diff else {
            return Err(ServiceError::InvalidArgument(
                "apply request without a layer descriptor".into(),
            ));
        };
        if !is_layer_media_type(&desc.media_type) {
            return not(format!(
                "media type {:?} is not a tar layer",
                desc.media_type
            ));
        }
        if !req.payloads.is_empty() {
            return not("the layer needs stream processors (payloads)".into());
        }
        let Some(fs_dir) = layer_dir_of(&req.mounts) else {
            return not("the mounts are not a single bind or overlay mount".into());
        };
        let Some((key, _)) = self.sn.active_by_fs_dir(&fs_dir)? else {
            return not(format!(
                "{} is not an active cas snapshot",
                fs_dir.display()
            ));
        };
        if self.sn.mode() != cas::StoreMode::Stubs {
            return not("the store is materialised (no data-only lower layers)".into());
        }
        let Ok(digest) = desc.digest.parse::<Digest>() else {
            return not(format!("digest {:?} is not sha256", desc.digest));
        };
        let size = u64::try_from(desc.size).map_err(|_| {
            ServiceError::InvalidArgument(format!("negative blob size {}", desc.size))
        })?;
        let blob = self.open_blob(&digest, namespace).await?;
        let applied = self
            .sn
            .apply_blob(&key, blob, size, Some(digest), self.limits(), &self.pool)
            .await?;
        Ok(Descriptor {
            // what Apply returns describes the uncompressed tar
            media_type: MediaType::ImageLayer.to_string(),
            digest: format!("sha256:{}", applied.diff_id.hex()),
            size: applied.uncompressed_size as i64,
            annotations: Default::default(),
        })
    }

    /// The blob, from the content directory or else through the Content API.
    async fn open_blob(
        &self,
        digest: &Digest,
        namespace: Option<String>,
    ) -> Result<Box<dyn Read + Send>, ServiceError> {
        let path = self.cfg.content_dir.join(CONTENT_BLOBS).join(digest.hex());
        match self.pool.read_file(&path) {
            Ok(r) => {
                debug!(blob = %path.display(), "reading the blob from the content store");
                self.sn.metrics().blob_read(BlobSource::ContentDir);
                return Ok(Box::new(r));
            }
            Err(e) => {
                debug!(blob = %path.display(), error = %e, "blob not readable in content_dir; trying the Content API")
            }
        }
        match stream_blob(&self.cfg.containerd_address, digest, namespace).await {
            Ok(r) => {
                self.sn.metrics().blob_read(BlobSource::ContentApi);
                Ok(Box::new(r))
            }
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    let reach = BlobReach::check(&self.cfg);
                    warn!(
                        blob = %digest,
                        reach = %reach.describe(&self.cfg),
                        "a layer blob was found neither in [differ] content_dir nor through [differ] containerd_address: handed back to containerd's applier (said once)"
                    );
                }
                Err(ServiceError::NotApplicable(format!(
                "blob sha256:{} is neither in {} nor readable through containerd's Content API at {}: {e}",
                digest.hex(),
                self.cfg.content_dir.display(),
                self.cfg.containerd_address.display()
            )))
            }
        }
    }
}

/// Opens a read of `digest` through containerd's Content API; the bytes arrive on a
/// bounded channel read by the (blocking) unpack.
async fn stream_blob(
    address: &Path,
    digest: &Digest,
    namespace: Option<String>,
) -> Result<ChunkReader<'static>, Box<dyn std::error::Error + Send + Sync>> {
    let address = address.to_path_buf();
    // The URI is required by tonic and ignored by the connector.
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            tokio::net::UnixStream::connect(address.clone())
        }))
        .await?;
    let mut client = ContentClient::new(channel);
    let mut req = Request::new(ReadContentRequest {
        digest: format!("sha256:{}", digest.hex()),
        offset: 0,
        size: 0,
    });
    if let Some(ns) = namespace.and_then(|n| n.parse().ok()) {
        req.metadata_mut().insert(NAMESPACE_HEADER, ns);
    }
    let mut stream = client.read(req).await?.into_inner();
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(STREAM_CHUNKS);
    tokio::spawn(async move {
        loop {
            let next = stream.message().await;
            let item = match next {
                Ok(Some(m)) => Ok(m.data),
                Ok(None) => break,
                Err(status) => Err(io::Error::other(format!("content API: {status}"))),
            };
            let failed = item.is_err();
            // The channel is bounded: wait for room off the runtime's threads.
            let tx = tx.clone();
            let sent = tokio::task::spawn_blocking(move || tx.send(item).is_ok())
                .await
                .unwrap_or(false);
            if !sent || failed {
                break;
            }
        }
    });
    Ok(ChunkReader::new(rx))
}

#[tonic::async_trait]
impl Diff for CasDiffer {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let namespace = req
            .metadata()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = req.into_inner();
        let digest = req
            .diff
            .as_ref()
            .map(|d| d.digest.clone())
            .unwrap_or_default();
        match self.apply_request(req, namespace).await {
            Ok(applied) => Ok(Response::new(ApplyResponse {
                applied: Some(applied),
            })),
            Err(ServiceError::NotApplicable(why)) => {
                self.sn.metrics().apply_fallback();
                info!(layer = %digest, reason = %why, "apply handed back to containerd's applier");
                Err(ServiceError::NotApplicable(why).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn diff(&self, _req: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        Err(Status::unimplemented(
            "cas-diff applies layers only; containerd's walking differ creates diffs",
        ))
    }
}

/// The tonic service for `differ`.
pub fn server(differ: CasDiffer) -> DiffServer<CasDiffer> {
    DiffServer::new(differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn layer_dir_is_the_bind_source_or_the_overlay_upper() {
        let bind = mount("bind", "/r/snapshots/3/fs", &["rw", "rbind"]);
        assert_eq!(
            layer_dir_of(&[bind]),
            Some(PathBuf::from("/r/snapshots/3/fs"))
        );
        let ovl = mount(
            "overlay",
            "overlay",
            &[
                "metacopy=on",
                "lowerdir=/r/snapshots/1/fs::/r/cas/objects",
                "upperdir=/r/snapshots/4/fs",
                "workdir=/r/snapshots/4/work",
            ],
        );
        assert_eq!(
            layer_dir_of(std::slice::from_ref(&ovl)),
            Some(PathBuf::from("/r/snapshots/4/fs"))
        );
        // a view (no upper), several mounts, or another kind: not ours to apply into
        assert_eq!(
            layer_dir_of(&[mount("overlay", "overlay", &["lowerdir=/a::/b"])]),
            None
        );
        assert_eq!(layer_dir_of(&[ovl.clone(), ovl]), None);
        assert_eq!(layer_dir_of(&[mount("erofs", "/x", &[])]), None);
        assert_eq!(layer_dir_of(&[]), None);
    }

    #[test]
    fn layer_media_types() {
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+gzip"
        ));
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+zstd"
        ));
        assert!(is_layer_media_type(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(!is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
        assert!(!is_layer_media_type(
            "application/vnd.oci.image.config.v1+json"
        ));
    }

    /// A containerd with its root or socket elsewhere than the config says is found at
    /// once, and the message names the two keys to set.
    #[test]
    fn blob_reach_names_the_keys_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DifferConfig {
            content_dir: dir.path().join("content"),
            containerd_address: dir.path().join("containerd.sock"),
            ..DifferConfig::default()
        };
        let none = BlobReach::check(&cfg);
        assert!(!none.reachable());
        let msg = none.describe(&cfg);
        assert!(msg.contains("[differ] content_dir"), "{msg}");
        assert!(msg.contains("[differ] containerd_address"), "{msg}");

        let _listening = std::os::unix::net::UnixListener::bind(&cfg.containerd_address).unwrap();
        let api = BlobReach::check(&cfg);
        assert_eq!((api.content_dir, api.content_api), (false, true));
        assert!(api.describe(&cfg).contains("Content API"));

        std::fs::create_dir_all(cfg.content_dir.join("blobs/sha256")).unwrap();
        let both = BlobReach::check(&cfg);
        assert!(both.content_dir && both.content_api);
        assert!(both.describe(&cfg).contains("content directory"));
    }
}
