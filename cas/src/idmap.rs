//! ID-mapped snapshots: a user-namespaced container (`ctr run --uidmap`,
//! Kubernetes' `hostUsers: false`) on an image's layers, without a copy of them.
//!
//! containerd asks for one with two labels on Prepare or View,
//! `containerd.io/snapshot/uidmapping` and `…/gidmapping`, each `c:h:s[,c:h:s…]`
//! (container ID, host ID, count), once the snapshotter declares the `remap-ids`
//! capability (for a proxy plugin, `capabilities = ["remap-ids"]` in containerd's
//! config). The snapshot's own directory (the upper layer) is owned by the host IDs of
//! the container's root, as containerd's overlayfs snapshotter does. Its lower layers
//! are ID-mapped read-only clones of the layers' trees, one per layer, under the
//! snapshot's own directory (`snapshots/<id>/mapped/<layer>`, [`crate::Layout::mapped_dir`]),
//! so the overlay containerd mounts shows every file owned by its mapped owner while
//! the layers and their objects stay shared by every container on the node. The
//! data-only object layer needs no mapping: overlayfs takes a file's owner from its
//! metadata layer.
//!
//! The daemon makes these clones itself instead of returning `uidmap=`/`gidmap=` mount
//! options: containerd's mount code ID-maps the lower directories' common parent with
//! a non-recursive clone (which would hide each layer's image mount) and splits
//! `lowerdir=` on `:`, losing the data-only separator `::`.
//!
//! Where containerd took its chown path instead (no `remap-ids` declared, or
//! `ctr run --uidmap` without `--remap-labels`), the parent layer is a copy already
//! owned by host IDs, and its children carry the labels all the same; such a chain is
//! mounted as it is ([`needs_clones`]). Clones live as long as the snapshot: detached at
//! Remove, by the orphan sweep and reconcile, and at shutdown; after a crash the next
//! Mounts finds them in place.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use ringio::idmap::IdRange;

use crate::error::CasError;
use crate::sys::Syscalls;

/// The label naming a snapshot's UID mapping.
pub const UID_MAPPING_LABEL: &str = "containerd.io/snapshot/uidmapping";
/// The label naming a snapshot's GID mapping.
pub const GID_MAPPING_LABEL: &str = "containerd.io/snapshot/gidmapping";

/// Why a snapshot's mapping labels cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// One label without the other.
    #[error("{present} is set but {missing} is not: a mapped snapshot needs both")]
    Incomplete {
        /// The label given.
        present: &'static str,
        /// The one missing.
        missing: &'static str,
    },
    /// A label that is not `c:h:s[,c:h:s…]`.
    #[error("{label}={value:?}: {reason} (expected container-id:host-id:count[,…])")]
    Malformed {
        /// Which label.
        label: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A snapshot's UID and GID mappings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdMapping {
    /// UID ranges.
    pub uids: Vec<IdRange>,
    /// GID ranges.
    pub gids: Vec<IdRange>,
}

fn parse_ranges(label: &'static str, value: &str) -> Result<Vec<IdRange>, MappingError> {
    let bad = |reason| MappingError::Malformed {
        label,
        value: value.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in value.split(',') {
        let fields: Vec<&str> = part.trim().split(':').collect();
        let [c, h, s] = fields[..] else {
            return Err(bad("a range is not three numbers"));
        };
        let num = |f: &str| f.parse::<u32>().map_err(|_| bad("not a 32-bit number"));
        let r = IdRange {
            inside: num(c)?,
            outside: num(h)?,
            count: num(s)?,
        };
        if r.count == 0 {
            return Err(bad("a range of no IDs"));
        }
        if r.inside.checked_add(r.count - 1).is_none()
            || r.outside.checked_add(r.count - 1).is_none()
        {
            return Err(bad("a range past the last ID"));
        }
        out.push(r);
    }
    Ok(out)
}

fn to_host(ranges: &[IdRange], id: u32) -> Option<u32> {
    ranges
        .iter()
        .find(|r| id >= r.inside && id - r.inside < r.count)
        .map(|r| r.outside + (id - r.inside))
}

impl IdMapping {
    /// The mapping a snapshot's labels ask for: none without either label.
    pub fn from_labels(
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<IdMapping>, MappingError> {
        match (labels.get(UID_MAPPING_LABEL), labels.get(GID_MAPPING_LABEL)) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(MappingError::Incomplete {
                present: UID_MAPPING_LABEL,
                missing: GID_MAPPING_LABEL,
            }),
            (None, Some(_)) => Err(MappingError::Incomplete {
                present: GID_MAPPING_LABEL,
                missing: UID_MAPPING_LABEL,
            }),
            (Some(u), Some(g)) => Ok(Some(IdMapping {
                uids: parse_ranges(UID_MAPPING_LABEL, u)?,
                gids: parse_ranges(GID_MAPPING_LABEL, g)?,
            })),
        }
    }

    /// The host UID and GID of the container's root, which own its upper directory.
    /// `None` when the mapping leaves root unmapped.
    pub fn host_root(&self) -> Option<(u32, u32)> {
        Some((to_host(&self.uids, 0)?, to_host(&self.gids, 0)?))
    }

    /// Whether it maps the container's root to the host's root (nothing to map).
    pub fn is_identity_for_root(&self) -> bool {
        self.host_root() == Some((0, 0))
    }
}

/// Whether a snapshot with `map` over the layer tree `top` (its immediate parent, or
/// the chain's flattened tree) needs ID-mapped clones of its layers: not when the tree
/// is already owned by the mapped root, a copy containerd chowned itself.
pub fn needs_clones(map: &IdMapping, top: &Path) -> Result<bool, CasError> {
    if map.is_identity_for_root() {
        return Ok(false);
    }
    let md = fs::metadata(top).map_err(CasError::io("stat", top))?;
    Ok(map.host_root() != Some((md.uid(), md.gid())))
}

/// One clone a mapped snapshot's mounts need: the layer tree and where its mapped
/// clone is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clone {
    /// The layer's tree (its `fs`, or a chain's `flat`).
    pub source: PathBuf,
    /// Where the clone goes (under `snapshots/<id>/mapped`).
    pub target: PathBuf,
}

/// Attaches the clones of `clones` that are not attached yet, all through one user
/// namespace carrying `map`.
pub fn ensure_clones(
    sys: &dyn Syscalls,
    map: &IdMapping,
    clones: &[Clone],
) -> Result<(), CasError> {
    let mut missing = Vec::new();
    for c in clones {
        fs::create_dir_all(&c.target).map_err(CasError::io("mkdir", &c.target))?;
        let attached =
            ringio::idmap::is_mount_root(&c.target).map_err(CasError::io("statx", &c.target))?;
        if !attached {
            missing.push(c.clone());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    sys.idmap_clones(map, &missing)
        .map_err(CasError::io("ID-map a layer", &missing[0].source))
}

/// Detaches every clone under a snapshot's `mapped` directory (all of each, should one
/// have been attached twice). Returns how many were detached.
pub fn detach_clones(sys: &dyn Syscalls, mapped: &Path) -> Result<u64, CasError> {
    let entries = match fs::read_dir(mapped) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        r => r.map_err(CasError::io("read dir", mapped))?,
    };
    let mut detached = 0;
    for e in entries {
        let p = e.map_err(CasError::io("read dir", mapped))?.path();
        while ringio::idmap::is_mount_root(&p).map_err(CasError::io("statx", &p))? {
            sys.unmount(&p).map_err(CasError::io("umount", &p))?;
            detached += 1;
        }
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(u: Option<&str>, g: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        if let Some(u) = u {
            l.insert(UID_MAPPING_LABEL.to_string(), u.to_string());
        }
        if let Some(g) = g {
            l.insert(GID_MAPPING_LABEL.to_string(), g.to_string());
        }
        l.insert("other".into(), "x".into());
        l
    }

    #[test]
    fn labels_as_containerd_writes_them() {
        assert_eq!(IdMapping::from_labels(&labels(None, None)), Ok(None));
        let m = IdMapping::from_labels(&labels(
            Some("0:100000:65536"),
            Some("0:200000:65536,65536:5:1"),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(m.host_root(), Some((100_000, 200_000)));
        assert_eq!(m.gids.len(), 2);
        assert_eq!(to_host(&m.gids, 65_536), Some(5));
        assert_eq!(to_host(&m.uids, 65_536), None);
        assert!(!m.is_identity_for_root());
        let id = IdMapping::from_labels(&labels(Some("0:0:65536"), Some("0:0:65536")))
            .unwrap()
            .unwrap();
        assert!(id.is_identity_for_root());
    }

    #[test]
    fn bad_labels_say_which_and_why() {
        let e = IdMapping::from_labels(&labels(Some("0:1:2"), None)).unwrap_err();
        assert!(e.to_string().contains("gidmapping is not"), "{e}");
        assert!(matches!(
            IdMapping::from_labels(&labels(None, Some("0:1:2"))),
            Err(MappingError::Incomplete { .. })
        ));
        for bad in ["0:1", "a:b:c", "0:1:0", "0:4294967295:2", "", "0:1:2,"] {
            let e = IdMapping::from_labels(&labels(Some(bad), Some("0:1:2"))).unwrap_err();
            assert!(matches!(e, MappingError::Malformed { .. }), "{bad}: {e}");
        }
        let unmapped_root = IdMapping::from_labels(&labels(Some("1:1000:10"), Some("0:1:2")))
            .unwrap()
            .unwrap();
        assert_eq!(unmapped_root.host_root(), None);
    }

    #[test]
    fn a_tree_owned_by_the_mapped_root_needs_no_clones() {
        let d = tempfile::tempdir().unwrap();
        let md = fs::metadata(d.path()).unwrap();
        let (uid, gid) = (md.uid(), md.gid());
        let map = |u: u32, g: u32| IdMapping {
            uids: vec![IdRange {
                inside: 0,
                outside: u,
                count: 1,
            }],
            gids: vec![IdRange {
                inside: 0,
                outside: g,
                count: 1,
            }],
        };
        assert!(!needs_clones(&map(uid, gid), d.path()).unwrap());
        assert!(needs_clones(&map(uid + 1, gid), d.path()).unwrap());
        assert!(!needs_clones(&map(0, 0), d.path()).unwrap());
        assert!(detach_clones(&crate::sys::Host, &d.path().join("none")).unwrap() == 0);
    }
}
