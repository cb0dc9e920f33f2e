//! The Snapshots service: containerd's snapshotter contract over the store.
//!
//! This layer checks what containerd's contract says about a request (an Update only
//! changes labels, a Walk filter parses), converts containerd's types to the store's
//! and back ([`crate::convert`]), forwards to [`cas::snapshots::Snapshots`], which owns
//! every crash-ordered step of create, commit, remove and recovery, and counts what
//! happened in the metrics. The store's calls block, so each runs on a blocking thread.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use cas::gc::GcStats;
use cas::index::{Kind, Record};
use cas::snapshots::{
    OpenOptions, RequestedIdmap, RequestedLayers, RequestedMode, SnapshotError, Snapshots,
};
use cas::unpack::{Applied, Limits};
use cas::{Digest, Layout, StoreMode};
use config::{IdmappedLayers, JournalKind, LayerMetadata, MountMode};
use containerd_snapshots::{api::types::Mount, Info, Snapshotter, Usage};
use ringio::journal::JournalMode;
use tracing::instrument;

use crate::convert;
use crate::error::ServiceError;
use crate::filter::FilterSet;
use crate::metrics::Metrics;

/// The snapshotter.
pub struct CasSnapshotter {
    store: Arc<Snapshots>,
    /// What `/metrics` exports.
    metrics: Arc<Metrics>,
    /// The Diff service's configuration, once it serves (for `casctl stats`).
    differ: std::sync::OnceLock<config::DifferConfig>,
    /// Partial pulls, once configured.
    remote: std::sync::OnceLock<crate::remote::Remote>,
}

impl CasSnapshotter {
    /// Opens the store at `layout`, recovering from whatever stopped it last (see
    /// `cas::snapshots`).
    pub fn open(layout: Layout, requested: MountMode) -> Result<CasSnapshotter, ServiceError> {
        let store = config::StoreConfig {
            mount_mode: requested,
            ..config::StoreConfig::default()
        };
        Self::open_with(layout, &store)
    }

    /// [`CasSnapshotter::open`] with the `[store]` section of the configuration.
    pub fn open_with(
        layout: Layout,
        store: &config::StoreConfig,
    ) -> Result<CasSnapshotter, ServiceError> {
        let opts = OpenOptions {
            mode: match store.mount_mode {
                MountMode::Auto => RequestedMode::Auto,
                MountMode::DataOnly => RequestedMode::DataOnly,
                MountMode::Materialised => RequestedMode::Materialised,
            },
            layers: match store.layer_metadata {
                LayerMetadata::Auto => RequestedLayers::Auto,
                LayerMetadata::Erofs => RequestedLayers::Images,
                LayerMetadata::Stubs => RequestedLayers::StubTrees,
            },
            journal: match store.journal {
                JournalKind::Auto => JournalMode::Auto,
                JournalKind::Rename => JournalMode::ForceRename,
            },
            idmapped_layers: match store.idmapped_layers {
                IdmappedLayers::Auto => RequestedIdmap::Auto,
                IdmappedLayers::Off => RequestedIdmap::Off,
            },
            index_cache_bytes: store.index_cache_mib.map(|m| m << 20),
            image_mounts: match store.image_mounts {
                config::ImageMounts::Auto => cas::sys::ImageMounts::Auto,
                config::ImageMounts::Loop => cas::sys::ImageMounts::Loop,
            },
        };
        let store = Snapshots::open(layout, opts, Arc::new(cas::sys::Host))?;
        crate::remote::sweep_builds(&store)?;
        let metrics = Arc::new(Metrics::new());
        metrics.recovered_in(store.recovered_in());
        Ok(CasSnapshotter {
            store: Arc::new(store),
            metrics,
            differ: std::sync::OnceLock::new(),
            remote: std::sync::OnceLock::new(),
        })
    }

    /// Runs `f` on the store on a blocking thread.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    /// [`CasSnapshotter::run`] for the requests that hold tens of MiB while they run (an
    /// apply, a Commit that ingests its tree, a collection): once `f` is done, the
    /// allocator's free memory goes back to the kernel, so an idle daemon does not keep
    /// the peak of its largest layer ([`ringio::memory`]).
    pub(crate) async fn run_large<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.run(move |s| {
            let done = f(s);
            ringio::memory::release_free_memory();
            done
        })
        .await
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records the Diff service's configuration, so stats can say where it reads blobs.
    pub fn attach_differ(&self, cfg: config::DifferConfig) {
        let _ = self.differ.set(cfg);
    }

    /// Turns partial pulls on (see [`crate::remote`]).
    pub fn attach_remote(&self, remote: crate::remote::Remote) {
        let _ = self.remote.set(remote);
    }

    pub(crate) fn remote(&self) -> Option<&crate::remote::Remote> {
        self.remote.get()
    }

    pub(crate) fn store(&self) -> &Arc<Snapshots> {
        &self.store
    }

    /// The store layout.
    pub fn layout(&self) -> &Layout {
        self.store.layout()
    }

    /// The store's mode.
    pub fn mode(&self) -> StoreMode {
        self.store.mode()
    }

    /// Makes every journaled change durable and retires the journal's records.
    pub async fn checkpoint(&self) -> Result<(), ServiceError> {
        self.run(|s| s.checkpoint()).await
    }

    /// The last step of a clean shutdown (see [`Snapshots::shutdown`]).
    pub async fn shutdown(&self) -> Result<(), ServiceError> {
        self.run(|s| s.shutdown()).await
    }

    /// Collects objects no committed snapshot references.
    pub async fn gc(&self) -> Result<GcStats, ServiceError> {
        let stats = self.run_large(|s| s.gc()).await?;
        self.metrics.collected(stats.removed, stats.freed_bytes);
        Ok(stats)
    }

    /// What each image holds alone and shares.
    pub async fn chain_usage(&self) -> Result<Vec<cas::sharing::ChainUsage>, ServiceError> {
        self.run(|s| s.chain_usage()).await
    }

    /// The store's own statistics, from the index's counters (the metrics' store
    /// figures), without [`CasSnapshotter::stats`]'s look at how blobs are reached.
    pub async fn store_stats(&self) -> Result<cas::admin::Stats, ServiceError> {
        self.run(|s| s.stats()).await
    }

    /// Store statistics (`casctl stats`), with how layers came in since start.
    pub async fn stats(&self) -> Result<cas::admin::Stats, ServiceError> {
        let mut s = self.store_stats().await?;
        let c = self.metrics.apply_counts();
        let partial = self.metrics.partial_counts();
        let verified = self.metrics.partial_verified_counts();
        s.ingest_paths = Some(cas::admin::IngestPaths {
            fast_path_applies: c.fast,
            fallback_applies: c.fallback,
            failed_applies: c.failed,
            commit_ingests: c.commit_ingests,
            partial_layers: partial.0,
            partial_fallbacks: partial.1,
            partial_diff_id_verified: verified.0,
            partial_toc_verified: verified.1,
            partial_fetched_bytes: partial.2,
            partial_layer_bytes: partial.3,
            blobs_from_content_dir: c.blobs_from_content_dir,
            blobs_from_content_api: c.blobs_from_content_api,
            io_backend: self.metrics.ring_backend().map(str::to_string),
            blob_source: self
                .differ
                .get()
                .filter(|d| d.enabled)
                .map(|d| crate::diff::BlobReach::check(d).describe(d)),
        });
        Ok(s)
    }

    /// Consistency check (`casctl fsck`).
    pub async fn fsck(&self, verify_objects: bool) -> Result<cas::fsck::FsckReport, ServiceError> {
        self.run(move |s| s.fsck(verify_objects)).await
    }

    /// [`CasSnapshotter::fsck`], sending how far it has come to `progress`.
    pub async fn fsck_with_progress(
        &self,
        verify_objects: bool,
        progress: tokio::sync::mpsc::UnboundedSender<cas::admin::Progress>,
    ) -> Result<cas::fsck::FsckReport, ServiceError> {
        self.run(move |s| {
            s.fsck_with_progress(verify_objects, &mut |p| {
                // a client that went away stops reading, not the check
                let _ = progress.send(p.clone());
            })
        })
        .await
    }

    /// The active snapshot whose layer directory is `fs_dir`, if it is one of ours.
    pub fn active_by_fs_dir(
        &self,
        fs_dir: &Path,
    ) -> Result<Option<(String, Record)>, ServiceError> {
        Ok(self.store.active_by_fs_dir(fs_dir)?)
    }

    /// Applies a layer blob into the active snapshot `key` in one pass (the Diff
    /// service's fast path; see [`Snapshots::apply_blob`]).
    pub async fn apply_blob(
        &self,
        key: &str,
        blob: Box<dyn std::io::Read + Send>,
        blob_size: u64,
        blob_digest: Option<Digest>,
        limits: Limits,
        pool: &ringio::Pool,
    ) -> Result<Applied, ServiceError> {
        let (key, pool) = (key.to_string(), pool.clone());
        let result = self
            .run_large(move |s| s.apply_blob(&key, blob, blob_size, blob_digest, limits, &pool))
            .await;
        match &result {
            Ok(applied) => self.metrics.applied(applied),
            Err(ServiceError::Snapshot(SnapshotError::Unpack(_))) => self.metrics.apply_failed(),
            Err(_) => {}
        }
        result
    }
}

#[tonic::async_trait]
impl Snapshotter for CasSnapshotter {
    type Error = ServiceError;

    #[instrument(skip(self), level = "debug")]
    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let rec = self.store.stat(&key)?;
        Ok(convert::info(key, rec))
    }

    #[instrument(skip(self, info), fields(key = %info.name), level = "debug")]
    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let key = info.name;
        let changes = convert::label_changes(&key, info.labels, fieldpaths)?;
        let k = key.clone();
        let rec = self.run(move |s| s.update_labels(&k, &changes)).await?;
        Ok(convert::info(key, rec))
    }

    #[instrument(skip(self), level = "debug")]
    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let usage = self.run(move |s| s.usage(&key)).await?;
        Ok(convert::usage(usage))
    }

    #[instrument(skip(self), level = "debug")]
    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let mounts = self.run(move |s| s.mounts(&key)).await?;
        Ok(convert::mounts(mounts))
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        let labels = convert::labels(labels);
        if let Some(target) = self.prepare_remote(&key, &parent, &labels).await {
            return Err(SnapshotError::AlreadyExists(target).into());
        }
        self.create(Kind::Active, key, parent, labels).await
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, convert::labels(labels))
            .await
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let labels = convert::labels(labels);
        let done = self
            .run_large(move |s| s.commit(&name, &key, labels))
            .await?;
        if !done.applied {
            self.metrics
                .ingested(done.stats.logical_bytes, done.stats.new_bytes);
        }
        Ok(())
    }

    #[instrument(skip(self), level = "debug")]
    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        self.run(move |s| s.remove(&key)).await
    }

    /// containerd calls Cleanup after its own garbage collection removed snapshots.
    async fn clear(&self) -> Result<(), Self::Error> {
        let stats = self.run_large(|s| s.cleanup()).await?;
        self.metrics.collected(stats.removed, stats.freed_bytes);
        Ok(())
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, ServiceError>>>;

    #[instrument(skip(self), level = "debug")]
    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let filter =
            FilterSet::parse(&filters).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let out: Vec<_> = self
            .store
            .list()?
            .into_iter()
            .filter(|(key, rec)| filter.matches(|path| convert::field(key, rec, path)))
            .map(|(key, rec)| Ok(convert::info(key, rec)))
            .collect();
        Ok(futures::stream::iter(out))
    }
}

impl CasSnapshotter {
    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, ServiceError> {
        let mounts = self
            .run(move |s| s.create(kind, &key, convert::parent(&parent), labels))
            .await?;
        Ok(convert::mounts(mounts))
    }
}
