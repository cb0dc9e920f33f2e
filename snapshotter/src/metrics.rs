//! Prometheus text metrics (`[metrics] address`, off by default), served at `/metrics`.
//!
//! Series (all prefixed `cas_`):
//!
//! * store: `objects`, `logical_bytes`, `physical_bytes`, `savings_ratio` (the figures
//!   of `casctl stats`, from the index's counters on every scrape);
//! * ingest: `ingested_layers_total`, `ingest_logical_bytes_total` (what the layers
//!   hold), `ingest_new_bytes_total` (what they added to the store);
//! * `grpc_request_duration_seconds{method}`: a histogram per Snapshots method, measured
//!   by a tower layer around the gRPC server;
//! * GC: `gc_runs_total`, `gc_freed_objects_total`, `gc_freed_bytes_total`;
//! * `recovery_seconds`: how long the last start's recovery (journal replay, index
//!   reconcile, sweeps) took;
//! * per image, labelled `image` with its top layer's name (the chain ID containerd
//!   commits it as), recomputed at most every [`STATS_MAX_AGE`] on scrape since they
//!   read every committed manifest: `image_unique_bytes` (what
//!   removing it frees) and `image_shared_bytes` (what other images keep), see
//!   `cas::sharing`.
//!
//! * Diff service: `diff_applies_total{result}` (`fast`: applied in one pass; `fallback`:
//!   handed back to containerd's applier with `Unimplemented`; `failed`), and
//!   `diff_uncompressed_bytes_total`;
//! * partial pulls: `partial_layers_total{result}` (`pulled`, or why the layer was
//!   pulled in full: `no_toc`, `no_tar_split`, `registry`, `registry_range`, `image`,
//!   `toc`, `content`, `diff_id`, `store`), `partial_fetched_bytes_total` (fetched from
//!   registries, TOCs included) and `partial_layer_bytes_total` (the compressed size
//!   of those layers: what a full pull fetches), `partial_verified_layers_total{verified}`
//!   (`diff_id`: the rebuilt archive is the diffID's; `toc`: checked against the TOC);
//! * I/O workers (`ringio`), read on scrape: `ring_backend{backend}` (1 for the one that
//!   runs), `ring_queue_depth`, `ring_backpressure_waits`, `ring_bytes_read`,
//!   `ring_bytes_written`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::service::CasSnapshotter;

/// Per-image figures older than this are recomputed on scrape.
pub const STATS_MAX_AGE: Duration = Duration::from_secs(10);

type Labels = Vec<(String, String)>;
type Hist = Family<Labels, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every series the daemon exports.
pub struct Metrics {
    registry: Registry,
    requests: Hist,
    objects: Gauge,
    logical_bytes: Gauge,
    physical_bytes: Gauge,
    savings_ratio: Gauge<f64, AtomicU64>,
    ingested_layers: Counter,
    ingest_logical_bytes: Counter,
    ingest_new_bytes: Counter,
    gc_runs: Counter,
    gc_freed_objects: Counter,
    gc_freed_bytes: Counter,
    recovery_seconds: Gauge<f64, AtomicU64>,
    applies: Family<Labels, Counter>,
    applied_bytes: Counter,
    blob_reads: Family<Labels, Counter>,
    partial_layers: Family<Labels, Counter>,
    partial_verified: Family<Labels, Counter>,
    partial_fetched_bytes: Counter,
    partial_layer_bytes: Counter,
    ring_backend: Family<Labels, Gauge>,
    image_unique_bytes: Family<Labels, Gauge>,
    image_shared_bytes: Family<Labels, Gauge>,
    ring_queue_depth: Gauge,
    ring_waits: Gauge,
    ring_read: Gauge,
    ring_written: Gauge,
    pool: std::sync::OnceLock<ringio::Pool>,
    stats_at: Mutex<Option<Instant>>,
}

/// Layer applies since start, by outcome (also shown by `casctl stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyCounts {
    /// Applied by the Diff service in one pass.
    pub fast: u64,
    /// Handed back to containerd's own applier.
    pub fallback: u64,
    /// Failed.
    pub failed: u64,
    /// Layers whose files containerd's applier wrote, ingested at Commit.
    pub commit_ingests: u64,
    /// Blobs the Diff service read from containerd's content directory.
    pub blobs_from_content_dir: u64,
    /// Blobs it streamed through containerd's Content API.
    pub blobs_from_content_api: u64,
}

/// Where the Diff service read a layer blob from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobSource {
    /// containerd's content store directory, read by the I/O workers.
    ContentDir,
    /// containerd's Content API, over its socket.
    ContentApi,
}

impl BlobSource {
    /// The label value in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobSource::ContentDir => "content_dir",
            BlobSource::ContentApi => "content_api",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cas");
        let requests: Hist = Family::new_with_constructor(request_histogram);
        registry.register(
            "grpc_request_duration_seconds",
            "Time to answer a Snapshots API request, per method",
            requests.clone(),
        );
        let m = Metrics {
            registry: Registry::default(),
            requests,
            objects: Gauge::default(),
            logical_bytes: Gauge::default(),
            physical_bytes: Gauge::default(),
            savings_ratio: Gauge::default(),
            ingested_layers: Counter::default(),
            ingest_logical_bytes: Counter::default(),
            ingest_new_bytes: Counter::default(),
            gc_runs: Counter::default(),
            gc_freed_objects: Counter::default(),
            gc_freed_bytes: Counter::default(),
            recovery_seconds: Gauge::default(),
            applies: Family::default(),
            applied_bytes: Counter::default(),
            blob_reads: Family::default(),
            partial_layers: Family::default(),
            partial_verified: Family::default(),
            partial_fetched_bytes: Counter::default(),
            partial_layer_bytes: Counter::default(),
            ring_backend: Family::default(),
            image_unique_bytes: Family::default(),
            image_shared_bytes: Family::default(),
            ring_queue_depth: Gauge::default(),
            ring_waits: Gauge::default(),
            ring_read: Gauge::default(),
            ring_written: Gauge::default(),
            pool: std::sync::OnceLock::new(),
            stats_at: Mutex::new(None),
        };
        registry.register(
            "diff_applies",
            "Layer applies of the Diff service, by result (fast, fallback, failed)",
            m.applies.clone(),
        );
        registry.register(
            "diff_uncompressed_bytes",
            "Uncompressed layer bytes applied in one pass",
            m.applied_bytes.clone(),
        );
        registry.register(
            "diff_blob_reads",
            "Layer blobs the Diff service opened, by source (content_dir: containerd's content \
             store read directly; content_api: streamed through containerd's Content API)",
            m.blob_reads.clone(),
        );
        registry.register(
            "image_unique_bytes",
            "Bytes removing the image frees: objects no other image has, its own layers' images (per top layer)",
            m.image_unique_bytes.clone(),
        );
        registry.register(
            "image_shared_bytes",
            "Bytes of the image's objects that other images reference too (per top layer)",
            m.image_shared_bytes.clone(),
        );
        registry.register(
            "ring_backend",
            "The I/O workers' backend (1 for the one running)",
            m.ring_backend.clone(),
        );
        registry.register(
            "ring_queue_depth",
            "Writes queued or running in the I/O workers",
            m.ring_queue_depth.clone(),
        );
        registry.register(
            "ring_backpressure_waits",
            "Times a producer waited for room in an I/O worker's queue",
            m.ring_waits.clone(),
        );
        registry.register(
            "ring_bytes_read",
            "Bytes of blobs read by the I/O workers",
            m.ring_read.clone(),
        );
        registry.register(
            "ring_bytes_written",
            "Bytes of new objects written by the I/O workers",
            m.ring_written.clone(),
        );
        registry.register("objects", "Objects in the store", m.objects.clone());
        registry.register(
            "logical_bytes",
            "Bytes of every committed layer's regular files (what overlayfs would store)",
            m.logical_bytes.clone(),
        );
        registry.register(
            "physical_bytes",
            "Bytes of the objects that hold them",
            m.physical_bytes.clone(),
        );
        registry.register(
            "savings_ratio",
            "1 - physical / logical",
            m.savings_ratio.clone(),
        );
        registry.register(
            "partial_layers",
            "Layers with a TOC on Prepare, by result (pulled partially, or why not)",
            m.partial_layers.clone(),
        );
        registry.register(
            "partial_verified_layers",
            "Layers pulled partially, by what they were checked against (diff_id, toc)",
            m.partial_verified.clone(),
        );
        registry.register(
            "partial_fetched_bytes",
            "Bytes partial pulls fetched from registries",
            m.partial_fetched_bytes.clone(),
        );
        registry.register(
            "partial_layer_bytes",
            "Compressed bytes of the layers pulled partially",
            m.partial_layer_bytes.clone(),
        );
        registry.register(
            "ingested_layers",
            "Layers committed",
            m.ingested_layers.clone(),
        );
        registry.register(
            "ingest_logical_bytes",
            "Bytes of the regular files of committed layers",
            m.ingest_logical_bytes.clone(),
        );
        registry.register(
            "ingest_new_bytes",
            "Bytes committed layers added to the store (new objects)",
            m.ingest_new_bytes.clone(),
        );
        registry.register("gc_runs", "Garbage collections", m.gc_runs.clone());
        registry.register(
            "gc_freed_objects",
            "Objects deleted by garbage collection",
            m.gc_freed_objects.clone(),
        );
        registry.register(
            "gc_freed_bytes",
            "Bytes freed by garbage collection",
            m.gc_freed_bytes.clone(),
        );
        registry.register(
            "recovery_seconds",
            "Time the last start spent on recovery",
            m.recovery_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One answered request of `method`.
    pub fn observe_request(&self, method: &str, took: Duration) {
        self.requests
            .get_or_create(&vec![("method".to_string(), method.to_string())])
            .observe(took.as_secs_f64());
    }

    /// One committed layer.
    pub fn ingested(&self, logical_bytes: u64, new_bytes: u64) {
        self.ingested_layers.inc();
        self.ingest_logical_bytes.inc_by(logical_bytes);
        self.ingest_new_bytes.inc_by(new_bytes);
    }

    /// One layer applied by the Diff service in one pass.
    pub fn applied(&self, a: &cas::unpack::Applied) {
        self.apply_result("fast").inc();
        self.applied_bytes.inc_by(a.uncompressed_size);
        self.ingested(a.stats.logical_bytes, a.stats.new_bytes);
    }

    /// One blob opened by the Diff service, from `source` (see [`BlobSource`]).
    pub fn blob_read(&self, source: BlobSource) {
        self.blob_reads_from(source).inc();
    }

    fn blob_reads_from(&self, source: BlobSource) -> Counter {
        self.blob_reads
            .get_or_create(&vec![("source".to_string(), source.as_str().to_string())])
            .clone()
    }

    /// One apply that failed.
    pub fn apply_failed(&self) {
        self.apply_result("failed").inc();
    }

    /// One apply handed back to containerd's applier.
    pub fn apply_fallback(&self) {
        self.apply_result("fallback").inc();
    }

    fn apply_result(&self, result: &str) -> Counter {
        self.applies
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .clone()
    }

    /// A layer pulled partially: `fetched` bytes of its `layer_bytes`, checked against
    /// the diffID (`by_diff_id`) or the TOC alone.
    pub fn partial_pulled(&self, fetched: u64, layer_bytes: u64, by_diff_id: bool) {
        self.partial_result("pulled").inc();
        self.partial_verified
            .get_or_create(&vec![(
                "verified".to_string(),
                if by_diff_id { "diff_id" } else { "toc" }.to_string(),
            )])
            .inc();
        self.partial_fetched_bytes.inc_by(fetched);
        self.partial_layer_bytes.inc_by(layer_bytes);
    }

    /// A layer with labels for a partial pull that was pulled in full, and why.
    pub fn partial_fallback(&self, reason: &str) {
        self.partial_result(reason).inc();
    }

    fn partial_result(&self, result: &str) -> Counter {
        self.partial_layers
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .clone()
    }

    /// Layers pulled partially since start and checked against the diffID, and against
    /// the TOC alone.
    pub fn partial_verified_counts(&self) -> (u64, u64) {
        let n = |v: &str| {
            self.partial_verified
                .get_or_create(&vec![("verified".to_string(), v.to_string())])
                .get()
        };
        (n("diff_id"), n("toc"))
    }

    /// Partial pulls since start: (pulled, pulled in full instead, fetched bytes,
    /// layer bytes).
    pub fn partial_counts(&self) -> (u64, u64, u64, u64) {
        let pulled = self.partial_result("pulled").get();
        let mut all = 0;
        for reason in crate::remote::FALLBACK_REASONS {
            all += self.partial_result(reason).get();
        }
        (
            pulled,
            all,
            self.partial_fetched_bytes.get(),
            self.partial_layer_bytes.get(),
        )
    }

    /// Counts of applies since start.
    pub fn apply_counts(&self) -> ApplyCounts {
        let fast = self.apply_result("fast").get();
        ApplyCounts {
            fast,
            fallback: self.apply_result("fallback").get(),
            failed: self.apply_result("failed").get(),
            commit_ingests: self.ingested_layers.get().saturating_sub(fast),
            blobs_from_content_dir: self.blob_reads_from(BlobSource::ContentDir).get(),
            blobs_from_content_api: self.blob_reads_from(BlobSource::ContentApi).get(),
        }
    }

    /// The I/O workers whose figures are exported.
    pub fn attach_pool(&self, pool: ringio::Pool) {
        let backend = pool.backend().as_str().to_string();
        self.ring_backend
            .get_or_create(&vec![("backend".to_string(), backend)])
            .set(1);
        let _ = self.pool.set(pool);
    }

    /// The I/O backend, once a pool is attached.
    pub fn ring_backend(&self) -> Option<&'static str> {
        self.pool.get().map(|p| p.backend().as_str())
    }

    fn refresh_ring(&self) {
        if let Some(p) = self.pool.get() {
            let s = p.stats();
            self.ring_queue_depth.set(s.queue_depth as i64);
            self.ring_waits.set(s.backpressure_waits as i64);
            self.ring_read.set(s.bytes_read as i64);
            self.ring_written.set(s.bytes_written as i64);
        }
    }

    /// One garbage collection.
    pub fn collected(&self, objects: u64, bytes: u64) {
        self.gc_runs.inc();
        self.gc_freed_objects.inc_by(objects);
        self.gc_freed_bytes.inc_by(bytes);
    }

    /// The start-up recovery time.
    pub fn recovered_in(&self, took: Duration) {
        self.recovery_seconds.set(took.as_secs_f64());
    }

    /// Whether the per-image figures are due for a refresh (and marks them refreshed).
    fn stats_due(&self) -> bool {
        let mut at = self.stats_at.lock().unwrap_or_else(|p| p.into_inner());
        let due = at.is_none_or(|t| t.elapsed() >= STATS_MAX_AGE);
        if due {
            *at = Some(Instant::now());
        }
        due
    }

    fn set_images(&self, images: &[cas::sharing::ChainUsage]) {
        self.image_unique_bytes.clear();
        self.image_shared_bytes.clear();
        for i in images {
            let l = vec![("image".to_string(), i.top.clone())];
            self.image_unique_bytes
                .get_or_create(&l)
                .set(i.unique_bytes as i64);
            self.image_shared_bytes
                .get_or_create(&l)
                .set(i.shared_bytes as i64);
        }
    }

    fn set_stats(&self, s: &cas::admin::Stats) {
        self.objects.set(s.objects as i64);
        self.logical_bytes.set(s.logical_bytes as i64);
        self.physical_bytes.set(s.physical_bytes as i64);
        self.savings_ratio.set(s.savings_percent / 100.0);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        self.refresh_ring();
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Times every gRPC request by the last segment of its path (the method).
#[derive(Clone)]
pub struct RequestTimer<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The tower layer that makes a [`RequestTimer`].
#[derive(Clone)]
pub struct RequestTimerLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RequestTimerLayer {
    type Service = RequestTimer<S>;
    fn layer(&self, inner: S) -> RequestTimer<S> {
        RequestTimer {
            inner,
            metrics: self.0.clone(),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for RequestTimer<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            metrics.observe_request(&method, started.elapsed());
            r
        })
    }
}

async fn answer(
    sn: Arc<CasSnapshotter>,
    req: hyper::Request<hyper::Body>,
) -> Result<hyper::Response<hyper::Body>, std::convert::Infallible> {
    if req.uri().path() != "/metrics" {
        let mut not_found = hyper::Response::new(hyper::Body::from("try /metrics\n"));
        *not_found.status_mut() = hyper::StatusCode::NOT_FOUND;
        return Ok(not_found);
    }
    let m = sn.metrics();
    // the index's counters: cheap on every scrape
    match sn.store_stats().await {
        Ok(s) => m.set_stats(&s),
        Err(e) => warn!(error = %e, "store statistics for metrics failed"),
    }
    if m.stats_due() {
        match sn.chain_usage().await {
            Ok(i) => m.set_images(&i),
            Err(e) => warn!(error = %e, "per-image figures for metrics failed"),
        }
    }
    let mut resp = hyper::Response::new(hyper::Body::from(m.encode()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    Ok(resp)
}

/// Serves `/metrics` on the address the channel holds (`None`: not at all), moving to
/// a new address when it changes (SIGHUP), forever.
pub async fn serve(sn: Arc<CasSnapshotter>, mut address: watch::Receiver<Option<SocketAddr>>) {
    loop {
        let current = *address.borrow_and_update();
        let Some(addr) = current else {
            if address.changed().await.is_err() {
                return;
            }
            continue;
        };
        let sn2 = sn.clone();
        let make = hyper::service::make_service_fn(move |_| {
            let sn = sn2.clone();
            async move {
                Ok::<_, std::convert::Infallible>(hyper::service::service_fn(move |req| {
                    answer(sn.clone(), req)
                }))
            }
        });
        let server = match hyper::Server::try_bind(&addr) {
            Ok(b) => b.serve(make),
            Err(e) => {
                warn!(%addr, error = %e, "cannot serve metrics; waiting for a new address");
                if address.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        info!(%addr, "serving metrics at /metrics");
        let mut stop = address.clone();
        let graceful = server.with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(e) = graceful.await {
            warn!(error = %e, "metrics server failed; retrying in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // the address changed (or the server failed): go round with the new one
        if address.has_changed().is_err() {
            return;
        }
    }
}
