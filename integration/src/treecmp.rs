//! The tree comparator: do two directory trees hold exactly the same files?
//!
//! Used to prove that a root filesystem served by cas-snapshotter equals the one
//! containerd's own overlayfs snapshotter serves for the same image. Compared, without
//! following symlinks: the set of paths, file types, bytes (streamed, bounded memory),
//! sizes, permission bits (set-id and sticky included), owners, modification times
//! (nanoseconds), xattrs (overlayfs' own `trusted.overlay.*` and `security.selinux`
//! excepted), symlink targets, device numbers, and hardlink groups: names that share an
//! inode in one tree must share one in the other, and no others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What to leave out of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Relative paths skipped with everything below them (e.g. `proc`, `dev`).
    pub ignore_paths: Vec<PathBuf>,
    /// Compare directory mtimes (the root's are never compared: it is the mount point).
    pub compare_mtime_dirs: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            ignore_paths: Vec::new(),
            compare_mtime_dirs: true,
        }
    }
}

/// Which side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first tree.
    A,
    /// The second tree.
    B,
}

/// One kind of difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffKind {
    /// The path exists only on the other side.
    Missing(Side),
    /// Different file types.
    Type(String, String),
    /// Different bytes.
    Content,
    /// Different sizes.
    Size(u64, u64),
    /// Different permission bits.
    Mode(u32, u32),
    /// Different owners.
    Owner((u32, u32), (u32, u32)),
    /// Different mtimes (seconds, nanoseconds).
    Mtime((i64, i64), (i64, i64)),
    /// Different xattrs.
    Xattrs(String, String),
    /// Different symlink targets.
    SymlinkTarget(PathBuf, PathBuf),
    /// Different device numbers.
    Device(u64, u64),
    /// The names sharing this file's inode differ.
    HardlinkGroup(Vec<PathBuf>, Vec<PathBuf>),
}

/// A difference at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Path relative to the roots.
    pub path: PathBuf,
    /// What differs.
    pub what: DiffKind,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match &self.what {
            DiffKind::Missing(Side::A) => write!(f, "{p}: only in B"),
            DiffKind::Missing(Side::B) => write!(f, "{p}: only in A"),
            DiffKind::Type(a, b) => write!(f, "{p}: type {a} vs {b}"),
            DiffKind::Content => write!(f, "{p}: contents differ"),
            DiffKind::Size(a, b) => write!(f, "{p}: size {a} vs {b}"),
            DiffKind::Mode(a, b) => write!(f, "{p}: mode {a:o} vs {b:o}"),
            DiffKind::Owner(a, b) => write!(f, "{p}: owner {}:{} vs {}:{}", a.0, a.1, b.0, b.1),
            DiffKind::Mtime(a, b) => {
                write!(f, "{p}: mtime {}.{:09} vs {}.{:09}", a.0, a.1, b.0, b.1)
            }
            DiffKind::Xattrs(a, b) => write!(f, "{p}: xattrs {a} vs {b}"),
            DiffKind::SymlinkTarget(a, b) => {
                write!(f, "{p}: symlink {} vs {}", a.display(), b.display())
            }
            DiffKind::Device(a, b) => write!(f, "{p}: device {a} vs {b}"),
            DiffKind::HardlinkGroup(a, b) => write!(f, "{p}: hardlinks {a:?} vs {b:?}"),
        }
    }
}

struct Node {
    md: fs::Metadata,
    path: PathBuf,
}

fn scan(root: &Path, opts: &CompareOptions) -> Result<BTreeMap<PathBuf, Node>> {
    let mut out = BTreeMap::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name();
    let mut it = walk.into_iter();
    while let Some(entry) = it.next() {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        let rel = entry.path().strip_prefix(root)?.to_path_buf();
        if opts.ignore_paths.contains(&rel) {
            if entry.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        let md = fs::symlink_metadata(entry.path())?;
        out.insert(
            rel,
            Node {
                md,
                path: entry.path().to_path_buf(),
            },
        );
    }
    Ok(out)
}

fn type_name(md: &fs::Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

fn xattrs(path: &Path) -> Result<String> {
    let mut m = BTreeMap::new();
    for name in xattr::list(path)? {
        let n = name.to_string_lossy().into_owned();
        if n.starts_with("trusted.overlay.") || n == "security.selinux" {
            continue;
        }
        let v = xattr::get(path, &name)?.unwrap_or_default();
        m.insert(n, String::from_utf8_lossy(&v).into_owned());
    }
    Ok(format!("{m:?}"))
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut ra, mut rb) = (
        BufReader::new(File::open(a)?),
        BufReader::new(File::open(b)?),
    );
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let na = read_full(&mut ra, &mut ba)?;
        let nb = read_full(&mut rb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn link_groups(tree: &BTreeMap<PathBuf, Node>) -> HashMap<PathBuf, Vec<PathBuf>> {
    let mut by_inode: HashMap<(u64, u64), BTreeSet<PathBuf>> = HashMap::new();
    for (rel, n) in tree {
        if n.md.is_file() && n.md.nlink() > 1 {
            by_inode
                .entry((n.md.dev(), n.md.ino()))
                .or_default()
                .insert(rel.clone());
        }
    }
    let mut out = HashMap::new();
    for group in by_inode.into_values() {
        let v: Vec<PathBuf> = group.into_iter().collect();
        for p in &v {
            out.insert(p.clone(), v.clone());
        }
    }
    out
}

/// Compares the trees under `a` and `b`; an empty result means they are identical.
pub fn compare_trees(a: &Path, b: &Path, opts: &CompareOptions) -> Result<Vec<Difference>> {
    let ta = scan(a, opts)?;
    let tb = scan(b, opts)?;
    let (ga, gb) = (link_groups(&ta), link_groups(&tb));
    let mut diffs = Vec::new();
    let mut push = |path: &Path, what| {
        diffs.push(Difference {
            path: path.to_path_buf(),
            what,
        })
    };
    let paths: BTreeSet<&PathBuf> = ta.keys().chain(tb.keys()).collect();
    for rel in paths {
        let (na, nb) = match (ta.get(rel), tb.get(rel)) {
            (Some(x), Some(y)) => (x, y),
            (None, _) => {
                push(rel, DiffKind::Missing(Side::A));
                continue;
            }
            (_, None) => {
                push(rel, DiffKind::Missing(Side::B));
                continue;
            }
        };
        let (ma, mb) = (&na.md, &nb.md);
        if type_name(ma) != type_name(mb) {
            push(
                rel,
                DiffKind::Type(type_name(ma).into(), type_name(mb).into()),
            );
            continue;
        }
        let is_root = rel.as_os_str().is_empty();
        if ma.mode() & 0o7777 != mb.mode() & 0o7777 && !ma.file_type().is_symlink() {
            push(rel, DiffKind::Mode(ma.mode() & 0o7777, mb.mode() & 0o7777));
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            push(
                rel,
                DiffKind::Owner((ma.uid(), ma.gid()), (mb.uid(), mb.gid())),
            );
        }
        let check_mtime = !is_root && (!ma.is_dir() || opts.compare_mtime_dirs);
        if check_mtime && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            push(
                rel,
                DiffKind::Mtime((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec())),
            );
        }
        if !ma.file_type().is_symlink() {
            let (xa, xb) = (xattrs(&na.path)?, xattrs(&nb.path)?);
            if xa != xb {
                push(rel, DiffKind::Xattrs(xa, xb));
            }
        }
        let t = ma.file_type();
        if t.is_symlink() {
            let (la, lb) = (fs::read_link(&na.path)?, fs::read_link(&nb.path)?);
            if la != lb {
                push(rel, DiffKind::SymlinkTarget(la, lb));
            }
        } else if t.is_char_device() || t.is_block_device() {
            if ma.rdev() != mb.rdev() {
                push(rel, DiffKind::Device(ma.rdev(), mb.rdev()));
            }
        } else if t.is_file() {
            if ma.len() != mb.len() {
                push(rel, DiffKind::Size(ma.len(), mb.len()));
            } else if !same_bytes(&na.path, &nb.path)? {
                push(rel, DiffKind::Content);
            }
            let (la, lb) = (
                ga.get(rel).cloned().unwrap_or_else(|| vec![rel.clone()]),
                gb.get(rel).cloned().unwrap_or_else(|| vec![rel.clone()]),
            );
            if la != lb {
                push(rel, DiffKind::HardlinkGroup(la, lb));
            }
        }
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"hello").unwrap();
        fs::write(root.join("g"), b"bytes").unwrap();
        fs::hard_link(root.join("g"), root.join("d/g2")).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("l")).unwrap();
        for p in ["d/f", "g", "l", "d"] {
            let t = nix::sys::time::TimeSpec::new(1_000, 5);
            nix::sys::stat::utimensat(
                None,
                &root.join(p),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
    }

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        tree(&a);
        tree(&b);
        (t, a, b)
    }

    fn kinds(a: &Path, b: &Path) -> Vec<String> {
        compare_trees(a, b, &CompareOptions::default())
            .unwrap()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn identical_trees_have_no_differences() {
        let (_t, a, b) = pair();
        assert!(kinds(&a, &b).is_empty(), "{:?}", kinds(&a, &b));
    }

    #[test]
    fn detects_each_kind_of_difference() {
        let (_t, a, b) = pair();
        fs::write(b.join("d/f"), b"HELLO").unwrap();
        let t = nix::sys::time::TimeSpec::new(1_000, 5);
        nix::sys::stat::utimensat(
            None,
            &b.join("d/f"),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        assert_eq!(kinds(&a, &b), ["d/f: contents differ"]);

        let (_t, a, b) = pair();
        fs::set_permissions(b.join("g"), fs::Permissions::from_mode(0o4755)).unwrap();
        assert!(
            kinds(&a, &b).iter().any(|k| k.starts_with("g: mode")),
            "{:?}",
            kinds(&a, &b)
        );

        let (_t, a, b) = pair();
        let t2 = nix::sys::time::TimeSpec::new(1_000, 6);
        nix::sys::stat::utimensat(
            None,
            &b.join("d"),
            &t2,
            &t2,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        assert!(
            kinds(&a, &b).iter().any(|k| k.starts_with("d: mtime")),
            "{:?}",
            kinds(&a, &b)
        );

        let (_t, a, b) = pair();
        fs::remove_file(b.join("l")).unwrap();
        std::os::unix::fs::symlink("elsewhere", b.join("l")).unwrap();
        let t = nix::sys::time::TimeSpec::new(1_000, 5);
        nix::sys::stat::utimensat(
            None,
            &b.join("l"),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        assert_eq!(kinds(&a, &b), ["l: symlink d/f vs elsewhere"]);

        let (_t, a, b) = pair();
        fs::remove_file(b.join("d/g2")).unwrap();
        fs::copy(b.join("g"), b.join("d/g2")).unwrap();
        let k = kinds(&a, &b);
        assert!(k.iter().any(|k| k.contains("hardlinks")), "{k:?}");

        let (_t, a, b) = pair();
        fs::write(a.join("extra"), b"").unwrap();
        fs::remove_file(b.join("g")).unwrap();
        let k = kinds(&a, &b);
        assert!(k.contains(&"extra: only in A".to_string()), "{k:?}");
        assert!(k.contains(&"g: only in A".to_string()), "{k:?}");

        let (_t, a, b) = pair();
        if xattr::set(b.join("g"), "user.x", b"1").is_ok() {
            assert!(kinds(&a, &b).iter().any(|k| k.contains("xattrs")));
        } else {
            eprintln!("user xattrs unsupported here; xattr case not checked");
        }

        if nix::unistd::geteuid().is_root() {
            let (_t, a, b) = pair();
            nix::unistd::chown(&b.join("g"), Some(1000.into()), Some(1000.into())).unwrap();
            assert!(kinds(&a, &b).iter().any(|k| k.starts_with("g: owner")));
        }
    }

    #[test]
    fn ignored_paths_are_skipped() {
        let (_t, a, b) = pair();
        fs::write(b.join("d/f"), b"different").unwrap();
        let opts = CompareOptions {
            ignore_paths: vec!["d".into()],
            ..Default::default()
        };
        let left: Vec<_> = compare_trees(&a, &b, &opts)
            .unwrap()
            .into_iter()
            .filter(|d| !d.path.starts_with("d"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
