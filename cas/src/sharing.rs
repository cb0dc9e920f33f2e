//! What each image holds alone and what it shares: the bytes its removal would free.
//!
//! With one object per distinct content, removing an image frees only what no other
//! image uses, where containerd's overlayfs frees every byte of the image's own layers.
//! kubelet's image GC counts an image's CRI `size` (its compressed blobs) as freed; this
//! is what the store really gives back, per image.
//!
//! An *image* here is a leaf chain: a committed layer with no committed child, and its
//! ancestors (containerd names it by the chain ID of the image's top layer). A layer is
//! *exclusive* to a chain when no other leaf chain contains it: containerd's GC removes
//! exactly those layers with the image. An object is *unique* to a chain when every
//! layer that references it is exclusive to that chain: the store deletes it at the next
//! GC once the image goes. Everything else the chain references is *shared*. A layer
//! under two images (a common base) is shared by both and freed by neither alone.
//!
//! Computed from the index's records and the committed layers' manifests, one pass over
//! each manifest: memory grows with the distinct objects of the store.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::CasError;
use crate::index::{Kind, MetaStore};
use crate::layout::Layout;

/// One image's (leaf chain's) bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainUsage {
    /// The top layer's name (the image's chain ID, as containerd commits it).
    pub top: String,
    /// Layers in the chain.
    pub layers: u64,
    /// Of them, the layers no other image has (removed with the image).
    pub exclusive_layers: u64,
    /// Bytes of the chain's distinct objects.
    pub object_bytes: u64,
    /// Bytes its removal frees: the objects unique to it, and the metadata images of its
    /// exclusive layers.
    pub unique_bytes: u64,
    /// Bytes of its objects that other images reference too.
    pub shared_bytes: u64,
}

/// Who keeps an object: one chain alone, or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Chain(usize),
    Shared,
}

/// Every leaf chain's [`ChainUsage`], largest unique bytes first.
pub fn chain_usage(layout: &Layout, meta: &MetaStore) -> Result<Vec<ChainUsage>, CasError> {
    let records = meta.all()?;
    let committed: HashMap<&str, &crate::index::Record> = records
        .iter()
        .filter(|(_, r)| r.kind == Kind::Committed)
        .map(|(k, r)| (k.as_str(), r))
        .collect();
    let has_committed_child: std::collections::HashSet<&str> = committed
        .values()
        .filter_map(|r| r.parent.as_deref())
        .collect();
    let mut leaves: Vec<(&str, Vec<u64>)> = Vec::new();
    for (key, rec) in &committed {
        if has_committed_child.contains(key) {
            continue;
        }
        let mut chain = vec![rec.id];
        chain.extend(meta.parent_ids(rec)?);
        leaves.push((key, chain));
    }
    leaves.sort_by(|a, b| a.0.cmp(b.0));
    // each layer's chains: one index, or shared
    let mut layer_owner: HashMap<u64, Owner> = HashMap::new();
    for (i, (_, chain)) in leaves.iter().enumerate() {
        for id in chain {
            layer_owner
                .entry(*id)
                .and_modify(|o| *o = Owner::Shared)
                .or_insert(Owner::Chain(i));
        }
    }
    // each object's owner and size, and each layer's distinct objects
    let mut objects: HashMap<Digest, (u64, Owner)> = HashMap::new();
    let mut layer_objects: HashMap<u64, Vec<Digest>> = HashMap::new();
    for (&id, &owner) in &layer_owner {
        let manifest = layout.manifest(id);
        let entries = match crate::manifest::read_manifest(&manifest) {
            Ok(e) => e,
            // removed since the records were read
            Err(CasError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut distinct = Vec::new();
        for e in entries {
            let e = e?;
            match objects.get_mut(&e.digest) {
                Some((_, o)) => {
                    if *o != owner {
                        *o = Owner::Shared;
                    }
                }
                None => {
                    objects.insert(e.digest, (e.size, owner));
                }
            }
            distinct.push(e.digest);
        }
        distinct.sort_unstable();
        distinct.dedup();
        layer_objects.insert(id, distinct);
    }
    let mut out = Vec::with_capacity(leaves.len());
    for (i, (key, chain)) in leaves.iter().enumerate() {
        let mut u = ChainUsage {
            top: key.to_string(),
            layers: chain.len() as u64,
            exclusive_layers: 0,
            object_bytes: 0,
            unique_bytes: 0,
            shared_bytes: 0,
        };
        let mut seen = std::collections::HashSet::new();
        for id in chain {
            if layer_owner.get(id) == Some(&Owner::Chain(i)) {
                u.exclusive_layers += 1;
                if let Ok(md) = std::fs::metadata(layout.image_file(*id)) {
                    u.unique_bytes += md.len();
                }
            }
            for d in layer_objects.get(id).into_iter().flatten() {
                if !seen.insert(*d) {
                    continue;
                }
                let (size, owner) = objects[d];
                u.object_bytes += size;
                if owner == Owner::Chain(i) {
                    u.unique_bytes += size;
                } else {
                    u.shared_bytes += size;
                }
            }
        }
        out.push(u);
    }
    out.sort_by(|a, b| b.unique_bytes.cmp(&a.unique_bytes).then(a.top.cmp(&b.top)));
    Ok(out)
}
