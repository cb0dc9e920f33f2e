//! A layer of a pull, as containerd names it on Prepare, opened on its registry.
//!
//! containerd's unpacker Prepares each layer's snapshot with the labels its image
//! handler added (`containerd.io/snapshot/cri.*`: the image reference, the manifest
//! digest, the layer digest) and the target, `containerd.io/snapshot.ref` (the chain
//! ID). The layer descriptor's own annotations, the zstd:chunked ones among them, are
//! not passed on, so the manifest is fetched by its digest, and with it the image
//! config, whose diffID for the layer the rebuilt archive must match.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cas::Digest;
use futures::StreamExt as _;

use crate::registry::{Registries, RegistryError, Repository};
use crate::stream::{Piece, Pieces, Plan};
use crate::toc::ChunkedLayer;
use crate::{LayerError, LayerToc};

/// The label naming the snapshot a Prepare is for (the layer's chain ID).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest's digest.
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's (compressed) digest.
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";

/// Why a layer cannot be pulled partially (it is then pulled in full).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry failed or refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The manifest or config is not what it should be.
    #[error("{0}")]
    Image(String),
    /// The layer's TOC or tar-split was refused.
    #[error(transparent)]
    Layer(#[from] LayerError),
}

impl PullError {
    /// A short name of the cause, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PullError::Registry(RegistryError::Range { .. }) => "registry_range",
            PullError::Registry(_) => "registry",
            PullError::Image(_) => "image",
            PullError::Layer(_) => "toc",
        }
    }
}

/// What the labels of a Prepare say of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// The snapshot containerd wants (chain ID).
    pub target: String,
    /// The image reference.
    pub image: String,
    /// The manifest's digest.
    pub manifest: String,
    /// The layer's digest.
    pub layer: String,
}

impl LayerRef {
    /// The layer named by `labels`, when they name one.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<LayerRef> {
        Some(LayerRef {
            target: labels.get(LABEL_TARGET)?.clone(),
            image: labels.get(LABEL_IMAGE_REF)?.clone(),
            manifest: labels.get(LABEL_MANIFEST)?.clone(),
            layer: labels.get(LABEL_LAYER)?.clone(),
        })
    }
}

/// A zstd:chunked layer opened on its registry.
pub struct RemoteLayer {
    repo: Arc<Repository>,
    /// The layer's digest.
    pub digest: String,
    /// The blob's size.
    pub size: u64,
    /// `zstd:chunked` or `eStargz`.
    pub format: &'static str,
    /// Its TOC and tar-split.
    pub toc: LayerToc,
    /// The image config's diffID of the layer.
    pub diff_id: Digest,
    /// Bytes fetched so far (TOC and tar-split included).
    pub fetched: Arc<AtomicU64>,
}

/// Opens the layer `r`: `Ok(None)` when it has no TOC (neither zstd:chunked nor
/// eStargz).
pub async fn open(regs: &Registries, r: &LayerRef) -> Result<Option<RemoteLayer>, PullError> {
    // An image's layers are Prepared one by one: its manifest is fetched once (and
    // nothing at all is asked of the registry for the layers of an image without TOCs).
    let mut repo = None;
    let manifest = match regs.cached(&r.manifest) {
        Some(m) => m,
        None => {
            let rp = Arc::new(regs.repository(&r.image).await?);
            let m = rp.manifest(&r.manifest).await?;
            repo = Some(rp);
            regs.remember(&r.manifest, m)
        }
    };
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)
        .map_err(|e| PullError::Image(format!("manifest {}: {e}", r.manifest)))?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| PullError::Image(format!("manifest {} has no layers", r.manifest)))?;
    let Some((index, desc)) = layers
        .iter()
        .enumerate()
        .find(|(_, l)| l["digest"].as_str() == Some(&r.layer))
    else {
        return Err(PullError::Image(format!(
            "manifest {} has no layer {}",
            r.manifest, r.layer
        )));
    };
    let annotations: BTreeMap<String, String> = desc["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let size = desc["size"]
        .as_u64()
        .ok_or_else(|| PullError::Image(format!("layer {} has no size", r.layer)))?;
    let chunked = ChunkedLayer::from_annotations(&annotations).map_err(LayerError::from)?;
    let estargz_digest = annotations
        .get(crate::estargz::TOC_DIGEST)
        .map(|d| {
            d.parse::<Digest>().map_err(|_| {
                PullError::Image(format!("layer {}: {d:?} is not a TOC digest", r.layer))
            })
        })
        .transpose()?;
    if chunked.is_none() && estargz_digest.is_none() {
        return Ok(None);
    }
    if let Some(meta) = &chunked {
        if meta.toc.end() > size || meta.tar_split.is_some_and(|t| t.end() > size) {
            return Err(PullError::Image(format!(
                "layer {}: its TOC or tar-split lies beyond the blob's {size} bytes",
                r.layer
            )));
        }
    }
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| PullError::Image(format!("manifest {} has no config", r.manifest)))?;
    let repo = match repo {
        Some(r) => r,
        None => Arc::new(regs.repository(&r.image).await?),
    };
    let config = match regs.cached(config_digest) {
        Some(c) => c,
        None => regs.remember(config_digest, repo.blob(config_digest).await?),
    };
    let config: serde_json::Value = serde_json::from_slice(&config)
        .map_err(|e| PullError::Image(format!("config {config_digest}: {e}")))?;
    let diff_id: Digest = config["rootfs"]["diff_ids"][index]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            PullError::Image(format!(
                "config {config_digest} has no diffID for layer {index}"
            ))
        })?;
    let fetched = Arc::new(AtomicU64::new(0));
    let get = |start: u64, end: u64| {
        let (repo, fetched, layer) = (repo.clone(), fetched.clone(), r.layer.clone());
        async move {
            let b = repo.range(&layer, start, end).await?;
            fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok::<_, PullError>(b)
        }
    };
    let (toc, format) = match (&chunked, estargz_digest) {
        (Some(meta), _) => {
            let toc_z = get(meta.toc.offset, meta.toc.end()).await?;
            let split_z = match meta.tar_split {
                Some(t) => Some(get(t.offset, t.end()).await?),
                None => None,
            };
            (
                LayerToc::from_parts(meta, &toc_z, split_z.as_deref())?,
                "zstd:chunked",
            )
        }
        (None, Some(digest)) => {
            let tail_start = size.saturating_sub(crate::estargz::FOOTER_SIZE);
            let tail = get(tail_start, size).await?;
            let (toc_at, footer) = crate::estargz::toc_offset(&tail).map_err(LayerError::from)?;
            if toc_at >= size - footer {
                return Err(PullError::Image(format!(
                    "layer {}: its TOC offset {toc_at} lies beyond the blob's {size} bytes",
                    r.layer
                )));
            }
            let member = get(toc_at, size - footer).await?;
            let toc = crate::estargz::parse_toc_member(&member, &digest, toc_at)
                .map_err(LayerError::from)?;
            (
                LayerToc {
                    toc,
                    tar_split: None,
                },
                "eStargz",
            )
        }
        (None, None) => unreachable!("returned above"),
    };
    Ok(Some(RemoteLayer {
        repo,
        digest: r.layer.clone(),
        size,
        format,
        toc,
        diff_id,
        fetched,
    }))
}

impl RemoteLayer {
    /// Where its bytes come from.
    pub fn registry(&self) -> &str {
        self.repo.registry()
    }

    /// Fetches `plan`'s requests, `parallel` at a time, in order, on `runtime`; the
    /// pieces arrive as they are needed (at most `parallel` ahead).
    pub fn pieces(&self, plan: &Plan, parallel: usize, runtime: &tokio::runtime::Handle) -> Pieces {
        let parallel = parallel.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Piece>>(parallel);
        let (repo, digest, fetched) =
            (self.repo.clone(), self.digest.clone(), self.fetched.clone());
        let requests = plan.requests.clone();
        runtime.spawn(async move {
            let mut answers = futures::stream::iter(requests)
                .map(|(start, end)| {
                    let (repo, digest) = (repo.clone(), digest.clone());
                    async move {
                        repo.range(&digest, start, end).await.map(|bytes| Piece {
                            offset: start,
                            bytes,
                        })
                    }
                })
                .buffered(parallel);
            while let Some(answer) = answers.next().await {
                let answer = answer
                    .inspect(|p| {
                        fetched.fetch_add(p.bytes.len() as u64, Ordering::Relaxed);
                    })
                    .map_err(io::Error::other);
                let failed = answer.is_err();
                // the stream's reader blocks on this channel: never from the runtime
                let tx = tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx.send(answer).is_ok())
                    .await
                    .unwrap_or(false);
                if !sent || failed {
                    break;
                }
            }
        });
        Box::new(rx.into_iter())
    }
}
