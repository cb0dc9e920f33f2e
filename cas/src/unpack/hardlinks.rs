//! Hardlinks: a link must name an entry earlier in the same layer, never a directory
//! and never anything outside it (its target is cleaned and resolved like every name).
//! A link to a stub is one more name of the same stub inode, counted once in the
//! layer's bytes and listed once per name in the manifest.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{UnpackError, Unpacker};
use crate::digest::Digest;
use crate::error::CasError;

impl Unpacker<'_> {
    /// A hardlink `rel` to `target`, a cleaned name of the layer.
    pub(super) fn hardlink(&mut self, rel: PathBuf, target: &Path) -> Result<(), UnpackError> {
        // cleared first, as for every entry, so the target cannot be this name
        self.clear(&rel, false)?;
        let target = match (target.file_name(), target.parent()) {
            (Some(b), p) => self.resolve_parent(p.unwrap_or(Path::new("")))?.join(b),
            (None, _) => target.to_path_buf(),
        };
        let tabs = self.abs(&target);
        match fs::symlink_metadata(&tabs) {
            Ok(md) if !md.is_dir() => {}
            _ => {
                return Err(CasError::Hostile {
                    path: rel,
                    reason: "hardlink to an entry that is not earlier in the same layer",
                }
                .into())
            }
        }
        let abs = self.abs(&rel);
        fs::hard_link(&tabs, &abs).map_err(CasError::io("link", &abs))?;
        if let Some((digest, size, ino)) = self.linked_content(&tabs)? {
            self.stats.files += 1;
            self.push_manifest(&rel, digest, size)?;
            if let Some(stubs) = self.alias_stubs.get_mut(&digest) {
                stubs.push((rel, ino));
            }
        }
        Ok(())
    }

    /// The object, size and inode behind an existing file of this layer (a hardlink's
    /// target), or `None` when it is not a stub (an empty file, a device, a symlink).
    fn linked_content(&mut self, abs: &Path) -> Result<Option<(Digest, u64, u64)>, CasError> {
        let md = fs::symlink_metadata(abs).map_err(CasError::io("stat", abs))?;
        if let Some((digest, size)) = self.recent.get(md.ino()) {
            return Ok(Some((digest, size, md.ino())));
        }
        let Some(target) = crate::stub::stub_target(self.t.store.sys(), abs)? else {
            return Ok(None);
        };
        // An old target: name the object from the stub (an alias is read to be sure).
        Ok(self
            .t
            .store
            .resolve(&target)?
            .map(|d| (d, md.len(), md.ino())))
    }
}

/// Hardlink targets remembered: tar writers put a hardlink right after (or close to) its
/// target, so the last few thousand files answer nearly every lookup with bounded memory;
/// an older target is looked up from its stub.
pub(super) const RECENT_FILES: usize = 1 << 16;

/// The digests of the most recently written stubs, by inode, at most [`RECENT_FILES`].
#[derive(Default)]
pub(super) struct RecentFiles {
    map: HashMap<u64, (Digest, u64)>,
    order: std::collections::VecDeque<u64>,
}

impl RecentFiles {
    pub(super) fn insert(&mut self, ino: u64, digest: Digest, size: u64) {
        if self.map.insert(ino, (digest, size)).is_none() {
            self.order.push_back(ino);
        }
        while self.order.len() > RECENT_FILES {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(super) fn get(&self, ino: u64) -> Option<(Digest, u64)> {
        self.map.get(&ino).copied()
    }
}
