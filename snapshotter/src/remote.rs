//! Remote snapshots: a layer Prepare names is built here from its TOC, and containerd
//! neither downloads nor applies its blob.
//!
//! containerd's unpacker Prepares each layer with `containerd.io/snapshot.ref` (the
//! snapshot it wants, the layer's chain ID) and, when the image handler adds them, the
//! `containerd.io/snapshot/cri.*` labels that name the image, its manifest and the
//! layer. Answering `AlreadyExists`, with a committed snapshot labelled with that
//! chain ID over the same parent, tells it the layer is there: it skips the fetch and
//! the apply (`CasSnapshotter::prepare_remote`).
//!
//! The layer is built in an active snapshot of its own (`cas-remote/…`), by the
//! store's one unpack path from the stream `remote::stream` assembles: files the store
//! holds are read from it, only the others are fetched. Around a tar-split the stream
//! is the original archive and must hash to the image config's diffID; without one the
//! layer is pulled in full unless `[remote] verify = "toc"`. Every failure removes
//! that snapshot (and the objects it added) and answers as if there were no labels:
//! containerd pulls the layer itself. Each fallback is logged with its reason and
//! counted (`cas_partial_layers_total{result}`). A build a stop interrupted is removed
//! at the next start ([`sweep_builds`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cas::index::Kind;
use cas::snapshots::{SnapshotError, Snapshots};
use cas::unpack::Limits;
use cas::Digest;
use config::{RemoteConfig, RemoteVerify};
use remote::pull::{LayerRef, PullError, RemoteLayer};
use remote::registry::{Registries, RegistryOptions};
use remote::stream::{Coalesce, LayerStream, ObjectSource};
use tracing::{debug, info, warn};

use crate::convert;
use crate::error::ServiceError;
use crate::service::CasSnapshotter;

/// The prefix of the snapshots remote layers are built in.
pub const BUILD_PREFIX: &str = "cas-remote/";
/// The label a remotely built layer carries: how it was verified.
pub const LABEL_PARTIAL: &str = "containerd.io/snapshot/cas.partial-pull";

/// Every `result` of `cas_partial_layers_total` but `pulled`.
pub const FALLBACK_REASONS: [&str; 9] = [
    "no_toc",
    "no_tar_split",
    "registry",
    "registry_range",
    "image",
    "toc",
    "content",
    "diff_id",
    "store",
];

/// Removes the snapshots of partial pulls a stop interrupted (active `cas-remote/…`
/// keys: containerd never knew them, so its garbage collection never would), and the
/// objects they had added. Run at start, before anything is served.
pub fn sweep_builds(store: &Snapshots) -> Result<usize, SnapshotError> {
    let mut removed = 0;
    for (key, rec) in store.list()? {
        if key.starts_with(BUILD_PREFIX) && rec.kind == Kind::Active {
            store.remove(&key)?;
            info!(%key, "removed the snapshot of a partial pull a stop interrupted");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Partial pulls: the registries, the configuration, and what applies a layer.
pub struct Remote {
    registries: Registries,
    cfg: RemoteConfig,
    pool: ringio::Pool,
    limits: Limits,
}

impl Remote {
    /// Partial pulls as `cfg` says, applied by `pool` within `limits`.
    pub fn new(cfg: RemoteConfig, pool: ringio::Pool, limits: Limits) -> Remote {
        let registries = Registries::new(RegistryOptions {
            config_path: Some(cfg.config_path.clone()),
            docker_config: Some(cfg.docker_config.clone()),
            timeout: Some(std::time::Duration::from_secs(cfg.timeout_secs)),
        });
        Remote {
            registries,
            cfg,
            pool,
            limits,
        }
    }
}

/// The store's objects, for the stream.
struct StoreObjects(Arc<Snapshots>);

impl ObjectSource for StoreObjects {
    fn open(&self, digest: &Digest) -> std::io::Result<std::fs::File> {
        self.0.open_object(digest)
    }
}

/// Why a built layer was not used.
struct Fallback {
    reason: &'static str,
    message: String,
}

impl From<PullError> for Fallback {
    fn from(e: PullError) -> Self {
        Fallback {
            reason: e.kind(),
            message: e.to_string(),
        }
    }
}

fn store_fallback(e: impl std::fmt::Display) -> Fallback {
    Fallback {
        reason: "store",
        message: e.to_string(),
    }
}

impl CasSnapshotter {
    /// Builds the layer a Prepare with remote snapshot labels asks for. `Some(target)`:
    /// the committed snapshot `target` is there (built now, or already), and Prepare
    /// answers `AlreadyExists`; `None`: Prepare goes on as usual.
    pub(crate) async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        let remote = self.remote().filter(|r| r.cfg.enabled)?;
        let layer_ref = LayerRef::from_labels(labels)?;
        let target = layer_ref.target.clone();
        // another pull (another namespace) built it already
        if let Ok(rec) = self.store().stat(&target) {
            if rec.kind == Kind::Committed && rec.parent.as_deref() == convert::parent(parent) {
                return Some(target);
            }
            return None;
        }
        let started = Instant::now();
        let layer = match remote::pull::open(&remote.registries, &layer_ref).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                debug!(%key, layer = %layer_ref.layer, "no TOC: the layer is pulled in full");
                self.metrics().partial_fallback("no_toc");
                return None;
            }
            Err(e) => {
                self.fell_back(&layer_ref, e.into());
                return None;
            }
        };
        if !layer.toc.has_tar_split() && remote.cfg.verify == RemoteVerify::DiffId {
            self.fell_back(
                &layer_ref,
                Fallback {
                    reason: "no_tar_split",
                    message: "the layer has no tar-split, so its diffID cannot be checked \
                              ([remote] verify = \"toc\" accepts TOC-verified layers)"
                        .into(),
                },
            );
            return None;
        }
        match self
            .build_remote(remote, &layer_ref, parent, labels, &layer)
            .await
        {
            Ok(plan) => {
                let fetched = layer.fetched.load(Ordering::Relaxed);
                self.metrics()
                    .partial_pulled(fetched, layer.size, layer.toc.has_tar_split());
                info!(
                    %key, target = %target, layer = %layer.digest, registry = layer.registry(),
                    format = layer.format,
                    verified = if layer.toc.has_tar_split() { "diffID" } else { "TOC" },
                    files = plan.files, fetched_files = plan.fetched_files,
                    fetched_bytes = fetched, layer_bytes = layer.size,
                    stored_bytes = plan.stored_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "layer pulled partially"
                );
                Some(target)
            }
            Err(f) => {
                self.fell_back(&layer_ref, f);
                None
            }
        }
    }

    fn fell_back(&self, r: &LayerRef, f: Fallback) {
        warn!(layer = %r.layer, image = %r.image, reason = f.reason, error = %f.message,
              "partial pull not possible; containerd pulls the layer in full");
        self.metrics().partial_fallback(f.reason);
    }

    async fn build_remote(
        &self,
        remote: &Remote,
        r: &LayerRef,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: &RemoteLayer,
    ) -> Result<remote::stream::Plan, Fallback> {
        let store = self.store().clone();
        let coalesce = Coalesce {
            max_gap: remote.cfg.max_gap_bytes,
            max_request: remote.cfg.max_request_bytes,
        };
        // a stat per file: off the runtime's threads
        let plan = tokio::task::block_in_place(|| {
            remote::stream::plan(&layer.toc.toc, |d| store.has_object(d), coalesce)
        });
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let build_key = format!("{BUILD_PREFIX}{nanos}/{}", r.target);
        {
            let (k, p) = (
                build_key.clone(),
                convert::parent(parent).map(str::to_string),
            );
            self.run(move |s| s.create(Kind::Active, &k, p.as_deref(), BTreeMap::new()))
                .await
                .map_err(store_fallback)?;
        }
        let result = self
            .fill_and_commit(remote, r, &build_key, labels, layer, &plan)
            .await;
        if let Err(f) = &result {
            let k = build_key.clone();
            if let Err(e) = self.run(move |s| s.remove(&k)).await {
                warn!(key = %build_key, error = %e, reason = f.reason,
                      "could not remove the snapshot of a failed partial pull");
            }
        }
        result.map(|()| plan)
    }

    async fn fill_and_commit(
        &self,
        remote: &Remote,
        r: &LayerRef,
        build_key: &str,
        labels: &BTreeMap<String, String>,
        layer: &RemoteLayer,
        plan: &remote::stream::Plan,
    ) -> Result<(), Fallback> {
        let pieces = layer.pieces(
            plan,
            remote.cfg.parallel,
            &tokio::runtime::Handle::current(),
        );
        let stream = LayerStream::new(
            layer.toc.toc.clone(),
            layer.toc.tar_split.clone(),
            plan,
            StoreObjects(self.store().clone()),
            pieces,
        )
        .map_err(|e| Fallback {
            reason: "toc",
            message: e.to_string(),
        })?;
        let failure = stream.failure();
        let (k, pool, limits, size) = (
            build_key.to_string(),
            remote.pool.clone(),
            remote.limits,
            layer.size,
        );
        let applied = self
            .run_large(move |s| s.apply_blob(&k, stream, size, None, limits, &pool))
            .await;
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                let cause = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(match cause {
                    Some(c) => Fallback {
                        reason: if matches!(c, remote::stream::AssembleError::Fetch(_)) {
                            "registry"
                        } else {
                            "content"
                        },
                        message: c.to_string(),
                    },
                    None => store_fallback(e),
                });
            }
        };
        let verified = if layer.toc.has_tar_split() {
            if applied.diff_id != layer.diff_id {
                return Err(Fallback {
                    reason: "diff_id",
                    message: format!(
                        "the rebuilt layer's digest {} is not the image's diffID {}",
                        applied.diff_id, layer.diff_id
                    ),
                });
            }
            format!("{}, diffID verified", layer.format)
        } else {
            format!("{}, TOC verified", layer.format)
        };
        let mut labels = labels.clone();
        labels.insert(LABEL_PARTIAL.to_string(), verified);
        let (name, k) = (r.target.clone(), build_key.to_string());
        match self.run_large(move |s| s.commit(&name, &k, labels)).await {
            Ok(_) => Ok(()),
            Err(ServiceError::Snapshot(SnapshotError::AlreadyExists(_))) => {
                // built meanwhile by another pull: ours goes
                let k = build_key.to_string();
                let _ = self.run(move |s| s.remove(&k)).await;
                Ok(())
            }
            Err(e) => Err(store_fallback(e)),
        }
    }
}
