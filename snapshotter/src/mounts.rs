//! Mount planning: which mounts containerd gets for a snapshot.
//!
//! Pure functions of the snapshot's kind and ancestry, so every case is unit-tested
//! without root. The shapes are exactly those of containerd's overlayfs snapshotter, so a
//! client that knows that snapshotter sees nothing new:
//!
//! | snapshot                     | mount |
//! | ---------------------------- | ----- |
//! | active, no parent            | `bind` of `fs`, `rw,rbind` |
//! | view, no parent              | `bind` of `fs`, `ro,rbind` |
//! | view, one parent             | `bind` of the parent's `fs`, `ro,rbind` |
//! | active with parents          | `overlay`: `workdir`, `upperdir`, `lowerdir=p1:p2:…` (immediate parent first) |
//! | view with several parents    | `overlay`: `lowerdir=p1:p2:…` only (read-only) |
//!
//! `index=off` is added when the kernel's overlay module has the `index` parameter, as
//! containerd does (an overlay mounted with an inode index refuses to be mounted again
//! with different lowers).
//!
//! Deep chains: a `lowerdir` of 128 layers under `<root>/snapshots/<id>/fs` exceeds one
//! page. containerd's mount code (`mount.All`, used by the shim, `ctr` and the
//! conformance suite) then rewrites the option relative to the layers' common directory
//! (`<root>/snapshots/`), leaving `<id>/fs` per layer: about 1 KiB for 128 layers.
//! [`lowerdir_fits_after_compaction`] checks that budget.

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

use crate::meta::Kind;

/// One page: the most `mount(2)` accepts for its data argument.
pub const PAGE_SIZE: usize = 4096;

/// Kernel features that change the mount options; probed once at start.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverlayFeatures {
    /// The overlay module has an `index` parameter: mount with `index=off`.
    pub index_param: bool,
}

impl OverlayFeatures {
    /// Reads the overlay module's parameters from sysfs.
    pub fn probe() -> OverlayFeatures {
        OverlayFeatures {
            index_param: Path::new("/sys/module/overlay/parameters/index").exists(),
        }
    }
}

/// Plans mounts for snapshots under one `snapshots/` directory.
#[derive(Debug, Clone)]
pub struct MountPlanner {
    snapshots_dir: PathBuf,
    features: OverlayFeatures,
}

impl MountPlanner {
    /// A planner for the snapshots in `snapshots_dir`.
    pub fn new(snapshots_dir: PathBuf, features: OverlayFeatures) -> MountPlanner {
        MountPlanner {
            snapshots_dir,
            features,
        }
    }

    /// `snapshots/<id>/fs`: the layer tree (upperdir of an active snapshot).
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string()).join("fs")
    }

    /// `snapshots/<id>/work`: the overlay workdir of an active snapshot.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string()).join("work")
    }

    /// The mounts of snapshot `id` of `kind` whose ancestors are `parents` (immediate
    /// parent first).
    pub fn plan(&self, kind: Kind, id: u64, parents: &[u64]) -> Vec<Mount> {
        let bind = |dir: PathBuf, mode: &str| Mount {
            r#type: "bind".into(),
            source: dir.display().to_string(),
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        match (kind, parents) {
            (Kind::View, []) => return vec![bind(self.fs_dir(id), "ro")],
            (_, []) => return vec![bind(self.fs_dir(id), "rw")],
            (Kind::View, [only]) => return vec![bind(self.fs_dir(*only), "ro")],
            _ => {}
        }
        let mut options = Vec::new();
        if self.features.index_param {
            options.push("index=off".to_string());
        }
        if kind != Kind::View {
            options.push(format!("workdir={}", self.work_dir(id).display()));
            options.push(format!("upperdir={}", self.fs_dir(id).display()));
        }
        let lowers: Vec<String> = parents
            .iter()
            .map(|p| self.fs_dir(*p).display().to_string())
            .collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    /// Whether a `lowerdir` over `parents` fits in one page once containerd has made it
    /// relative to `snapshots/` (see the module docs).
    pub fn lowerdir_fits_after_compaction(&self, parents: &[u64]) -> bool {
        let rel: usize = parents.iter().map(|p| format!("{p}/fs").len() + 1).sum();
        "lowerdir=".len() + rel < PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(index_param: bool) -> MountPlanner {
        MountPlanner::new("/r/snapshots".into(), OverlayFeatures { index_param })
    }

    fn show(m: &[Mount]) -> Vec<String> {
        m.iter()
            .map(|m| format!("{} {} {}", m.r#type, m.source, m.options.join(",")))
            .collect()
    }

    #[test]
    fn parentless_snapshots_are_binds() {
        let p = planner(true);
        assert_eq!(
            show(&p.plan(Kind::Active, 1, &[])),
            ["bind /r/snapshots/1/fs rw,rbind"]
        );
        assert_eq!(
            show(&p.plan(Kind::View, 1, &[])),
            ["bind /r/snapshots/1/fs ro,rbind"]
        );
    }

    #[test]
    fn single_parent_view_binds_the_parent_read_only() {
        assert_eq!(
            show(&planner(true).plan(Kind::View, 5, &[3])),
            ["bind /r/snapshots/3/fs ro,rbind"]
        );
    }

    #[test]
    fn active_with_parents_is_overlay_immediate_parent_first() {
        assert_eq!(
            show(&planner(true).plan(Kind::Active, 9, &[4, 2])),
            ["overlay overlay index=off,workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs"]
        );
        assert_eq!(
            show(&planner(false).plan(Kind::Active, 9, &[4])),
            ["overlay overlay workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/4/fs"]
        );
    }

    #[test]
    fn multi_parent_view_has_no_upper() {
        assert_eq!(
            show(&planner(false).plan(Kind::View, 9, &[4, 2])),
            ["overlay overlay lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs"]
        );
    }

    #[test]
    fn deep_chains_fit_after_compaction() {
        let parents: Vec<u64> = (1_000_000..1_000_128).collect();
        assert!(planner(true).lowerdir_fits_after_compaction(&parents));
    }
}
