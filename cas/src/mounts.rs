//! Mount planning: which mounts containerd gets for a snapshot.
//!
//! Pure functions of the snapshot's kind and ancestry, so every case is unit-tested
//! without root. Committed layers hold metadata stubs whose bytes live in the CAS, so any
//! mount that shows a committed layer is an overlay with `cas/objects` as its data-only
//! lower layer (`lowerdir=<layers>::<objects>`), even a view of a single layer, where
//! containerd's overlayfs snapshotter would use a read-only bind mount:
//!
//! | snapshot                 | mount |
//! | ------------------------ | ----- |
//! | active, no parent        | `bind` of `fs`, `rw,rbind` |
//! | view, no parent          | `bind` of `fs`, `ro,rbind` (an empty tree) |
//! | active with parents      | `overlay`: `workdir`, `upperdir`, `lowerdir=p1:p2:…::objects` (immediate parent first) |
//! | view with parents        | `overlay`: `lowerdir=p1:p2:…::objects` only (read-only) |
//!
//! `index=off` is added when the kernel's overlay module has the `index` parameter, as
//! containerd does. `metacopy=on` is required: without it overlayfs refuses (EPERM) a
//! stub that shadows a file of the same name in a lower layer. It also makes a chmod or
//! chown copy up metadata only; Commit resolves such upper files to the object of the
//! lower stub they copy (see `cas::ingest`). Stubs and their xattrs are only ever
//! written by ingest, which drops overlayfs xattrs that arrive with a layer, so
//! `metacopy=on` never follows a redirect a client wrote.
//!
//! Deep chains: the option string is one `mount(2)` data page, and containerd's
//! relative-path compaction does not understand `::`. When the layers do not fit,
//! the plan names the parent's flattened tree (`snapshots/<parent>/flat`, see
//! `cas::flatten`) as the only stub layer instead.
//!
//! A materialised store (kernels without data-only lower layers, see `cas::StoreMode`)
//! holds real files, so its mounts are exactly those of containerd's overlayfs
//! snapshotter: a read-only bind mount for a view of one layer, `lowerdir=p1:p2:…` without
//! `::` or `metacopy`, and containerd compacts deep chains itself.

use std::path::{Path, PathBuf};

use crate::index::Kind;
use crate::layout::Layout;
use crate::StoreMode;

/// One page: the most `mount(2)` accepts for its data argument (with the trailing NUL).
pub const PAGE_SIZE: usize = 4096;

/// One mount as containerd receives it (`mount -t <kind> <source> <target> -o <options>`,
/// the target chosen by containerd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem type: `bind` or `overlay`.
    pub kind: String,
    /// The source: a directory for a bind mount, `overlay` for an overlay.
    pub source: String,
    /// The mount options, in order.
    pub options: Vec<String>,
}

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

/// The mounts of a snapshot, and the flattened tree they rely on, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What containerd gets.
    pub mounts: Vec<Mount>,
    /// The snapshot id whose `flat` tree must exist before the mounts are handed out.
    pub flat: Option<u64>,
    /// The ID-mapped clones that must be attached before the mounts are handed out
    /// (none unless the snapshot is mapped).
    pub clones: Vec<crate::idmap::Clone>,
}

/// Plans mounts for snapshots under one store.
#[derive(Debug, Clone)]
pub struct MountPlanner {
    layout: Layout,
    features: OverlayFeatures,
    mode: StoreMode,
}

impl MountPlanner {
    /// A planner for the snapshots of the store at `layout`.
    pub fn new(layout: Layout, features: OverlayFeatures, mode: StoreMode) -> Self {
        MountPlanner {
            layout,
            features,
            mode,
        }
    }

    /// The stub trees an active snapshot `id` over `parents` is mounted on, topmost
    /// first: the chain's flattened tree when its mounts use one.
    pub fn lower_trees(&self, id: u64, parents: &[u64]) -> Vec<PathBuf> {
        match self.plan(Kind::Active, id, parents).flat {
            Some(top) => vec![self.layout.flat_dir(top)],
            None => parents.iter().map(|p| self.layout.fs_dir(*p)).collect(),
        }
    }

    /// The mounts of snapshot `id` of `kind` whose ancestors are `parents` (immediate
    /// parent first).
    pub fn plan(&self, kind: Kind, id: u64, parents: &[u64]) -> Plan {
        self.plan_for(kind, id, parents, false)
    }

    /// The same, for an ID-mapped snapshot when `mapped`: each lower layer is the
    /// snapshot's own ID-mapped clone of it (`snapshots/<id>/mapped/<layer>`, or
    /// `…/mapped/flat` for a flattened chain), listed in [`Plan::clones`].
    pub fn plan_for(&self, kind: Kind, id: u64, parents: &[u64], mapped: bool) -> Plan {
        let materialised = self.mode == StoreMode::Materialised;
        let mut clones = Vec::new();
        let lower = |clones: &mut Vec<crate::idmap::Clone>, source: PathBuf, name: String| {
            if !mapped {
                return source;
            }
            let target = self.layout.mapped_dir(id).join(name);
            clones.push(crate::idmap::Clone {
                source,
                target: target.clone(),
            });
            target
        };
        let bind = |dir: PathBuf, mode: &str, clones: Vec<crate::idmap::Clone>| Plan {
            mounts: vec![Mount {
                kind: "bind".into(),
                source: dir.display().to_string(),
                options: vec![mode.into(), "rbind".into()],
            }],
            flat: None,
            clones,
        };
        match (kind, parents) {
            (Kind::View, []) => return bind(self.layout.fs_dir(id), "ro", clones),
            (_, []) => return bind(self.layout.fs_dir(id), "rw", clones),
            (Kind::View, [only]) if materialised => {
                let dir = lower(&mut clones, self.layout.fs_dir(*only), only.to_string());
                return bind(dir, "ro", clones);
            }
            _ => {}
        }
        let mut options = Vec::new();
        if self.features.index_param {
            options.push("index=off".to_string());
        }
        if !materialised {
            options.push("metacopy=on".to_string());
        }
        if kind != Kind::View {
            options.push(format!("workdir={}", self.layout.work_dir(id).display()));
            options.push(format!("upperdir={}", self.layout.fs_dir(id).display()));
        }
        let objects = self.layout.objects_dir();
        let objects = objects.display();
        let layers: Vec<String> = parents
            .iter()
            .map(|p| {
                lower(&mut clones, self.layout.fs_dir(*p), p.to_string())
                    .display()
                    .to_string()
            })
            .collect();
        if materialised {
            options.push(format!("lowerdir={}", layers.join(":")));
        } else {
            options.push(format!("lowerdir={}::{objects}", layers.join(":")));
        }
        let mut flat = None;
        if !materialised && options.join(",").len() >= PAGE_SIZE {
            clones.clear();
            let dir = lower(
                &mut clones,
                self.layout.flat_dir(parents[0]),
                FLAT_CLONE.to_string(),
            );
            options.pop();
            options.push(format!("lowerdir={}::{objects}", dir.display()));
            flat = Some(parents[0]);
        }
        Plan {
            mounts: vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options,
            }],
            flat,
            clones,
        }
    }
}

/// The name of a mapped snapshot's clone of its chain's flattened tree.
const FLAT_CLONE: &str = "flat";

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(index_param: bool) -> MountPlanner {
        MountPlanner::new(
            Layout::at("/r"),
            OverlayFeatures { index_param },
            StoreMode::Stubs,
        )
    }

    #[test]
    fn materialised_stores_mount_like_containerds_overlayfs() {
        let p = MountPlanner::new(
            Layout::at("/r"),
            OverlayFeatures { index_param: true },
            StoreMode::Materialised,
        );
        assert_eq!(
            show(&p.plan(Kind::View, 5, &[3])),
            ["bind /r/snapshots/3/fs ro,rbind"]
        );
        assert_eq!(
            show(&p.plan(Kind::Active, 9, &[4, 2])),
            ["overlay overlay index=off,workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs"]
        );
        let deep: Vec<u64> = (1_000_000..1_000_200).collect();
        assert_eq!(p.plan(Kind::Active, 1, &deep).flat, None);
    }

    fn show(p: &Plan) -> Vec<String> {
        p.mounts
            .iter()
            .map(|m| format!("{} {} {}", m.kind, m.source, m.options.join(",")))
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
    fn single_parent_view_is_a_read_only_overlay_over_the_cas() {
        assert_eq!(
            show(&planner(true).plan(Kind::View, 5, &[3])),
            ["overlay overlay index=off,metacopy=on,lowerdir=/r/snapshots/3/fs::/r/cas/objects"]
        );
    }

    #[test]
    fn active_with_parents_is_overlay_immediate_parent_first() {
        assert_eq!(
            show(&planner(true).plan(Kind::Active, 9, &[4, 2])),
            ["overlay overlay index=off,metacopy=on,workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs::/r/cas/objects"]
        );
        assert_eq!(
            show(&planner(false).plan(Kind::Active, 9, &[4])),
            ["overlay overlay metacopy=on,workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/4/fs::/r/cas/objects"]
        );
    }

    #[test]
    fn multi_parent_view_has_no_upper() {
        let plan = planner(false).plan(Kind::View, 9, &[4, 2]);
        assert_eq!(
            show(&plan),
            ["overlay overlay metacopy=on,lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs::/r/cas/objects"]
        );
        assert_eq!(plan.flat, None);
    }

    #[test]
    fn mapped_snapshots_mount_their_own_clones_of_the_layers() {
        let plan = planner(false).plan_for(Kind::Active, 9, &[4, 2], true);
        assert_eq!(
            show(&plan),
            ["overlay overlay metacopy=on,workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/9/mapped/4:/r/snapshots/9/mapped/2::/r/cas/objects"]
        );
        let pairs: Vec<(String, String)> = plan
            .clones
            .iter()
            .map(|c| {
                (
                    c.source.display().to_string(),
                    c.target.display().to_string(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("/r/snapshots/4/fs".into(), "/r/snapshots/9/mapped/4".into()),
                ("/r/snapshots/2/fs".into(), "/r/snapshots/9/mapped/2".into())
            ]
        );
        // a parentless one has nothing to map: its own directory is chowned
        assert!(planner(false)
            .plan_for(Kind::Active, 1, &[], true)
            .clones
            .is_empty());
        assert!(planner(false).plan(Kind::Active, 9, &[4]).clones.is_empty());
        let m = MountPlanner::new(
            Layout::at("/r"),
            OverlayFeatures::default(),
            StoreMode::Materialised,
        );
        let view = m.plan_for(Kind::View, 5, &[3], true);
        assert_eq!(show(&view), ["bind /r/snapshots/5/mapped/3 ro,rbind"]);
        assert_eq!(view.clones.len(), 1);
        let deep: Vec<u64> = (1_000_000..1_000_200).rev().collect();
        let plan = planner(true).plan_for(Kind::Active, 2_000_000, &deep, true);
        assert_eq!(plan.flat, Some(1_000_199));
        assert_eq!(plan.clones.len(), 1);
        assert_eq!(
            plan.clones[0].source,
            Path::new("/r/snapshots/1000199/flat")
        );
        assert!(
            show(&plan)[0].ends_with("lowerdir=/r/snapshots/2000000/mapped/flat::/r/cas/objects")
        );
    }

    #[test]
    fn deep_chains_use_the_parents_flat_tree_and_fit_a_page() {
        let parents: Vec<u64> = (1_000_000..1_000_200).rev().collect();
        let plan = planner(true).plan(Kind::Active, 2_000_000, &parents);
        assert_eq!(plan.flat, Some(1_000_199));
        assert_eq!(
            show(&plan),
            ["overlay overlay index=off,metacopy=on,workdir=/r/snapshots/2000000/work,upperdir=/r/snapshots/2000000/fs,lowerdir=/r/snapshots/1000199/flat::/r/cas/objects"]
        );
        assert!(plan.mounts[0].options.join(",").len() < PAGE_SIZE);
    }
}
