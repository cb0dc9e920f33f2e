//! The apply's rules, without root: the calls that need it go to a recording fake
//! ([`crate::sys::fake::Recorder`]), which keeps `trusted.*` xattrs as `user.*` ones
//! and makes plain files for devices, so every tar-entry rule is checked on the tree
//! it leaves and the calls it made. `cas/tests/unpack.rs` runs real layers as root.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::stat::SFlag;
use nix::sys::time::TimeSpec;

use super::*;
use crate::objects::Redirect;
use crate::stub::{stub_target, write_stub, XATTR_REDIRECT};
use crate::sys::fake::{Call, Recorder};

/// A store on the fake, and one fresh layer directory per apply.
struct Rig {
    dir: tempfile::TempDir,
    layout: crate::Layout,
    store: ObjectStore,
    sys: Arc<Recorder>,
    pool: Pool,
    applies: u32,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let layout = crate::Layout::ensure(&dir.path().join("root")).unwrap();
        let sys = Arc::new(Recorder::new(true));
        let store = ObjectStore::new(&layout).with_syscalls(sys.clone());
        let pool = Pool::start(&ringio::PoolConfig {
            backend: ringio::BackendChoice::Threads,
            ..ringio::PoolConfig::default()
        })
        .unwrap();
        Rig {
            dir,
            layout,
            store,
            sys,
            pool,
            applies: 0,
        }
    }

    /// Applies the plain tar `entries` build into a new layer directory; returns it.
    fn apply(
        &mut self,
        entries: impl FnOnce(&mut Tar),
    ) -> (PathBuf, Result<Applied, ApplyFailure>) {
        self.applies += 1;
        let layer = self.dir.path().join(format!("layer-{}", self.applies));
        let fs_dir = layer.join("fs");
        fs::create_dir_all(&fs_dir).unwrap();
        let mut tar = Tar(tar::Builder::new(Vec::new()));
        entries(&mut tar);
        let blob = tar.0.into_inner().unwrap();
        let manifest = layer.join("manifest");
        let tmp = self.layout.tmp_dir();
        let target = Target {
            store: &self.store,
            tmp_dir: &tmp,
            fs_dir: &fs_dir,
            lowers: &[],
            manifest: &manifest,
            image: None,
            pool: &self.pool,
        };
        let r = apply_blob(
            &blob[..],
            blob.len() as u64,
            None,
            Limits::default(),
            &target,
        );
        (fs_dir, r)
    }
}

/// A tar being written; every entry is root's, mode 0644 (0755 for directories).
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }
    /// Appends `h` named `path` as archived: the tar crate's own setters refuse the
    /// hostile names these tests need (`..`, absolute paths), so the bytes go straight
    /// into the header's fields.
    fn append(&mut self, mut h: tar::Header, path: &str, link: Option<&str>, data: &[u8]) {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
    }
    fn file(&mut self, path: &str, data: &[u8]) -> &mut Tar {
        let h = Tar::header(tar::EntryType::Regular, data.len() as u64);
        self.append(h, path, None, data);
        self
    }
    fn owned_file(&mut self, path: &str, data: &[u8], uid: u64) -> &mut Tar {
        let mut h = Tar::header(tar::EntryType::Regular, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(uid);
        self.append(h, path, None, data);
        self
    }
    fn dir(&mut self, path: &str) -> &mut Tar {
        let h = Tar::header(tar::EntryType::Directory, 0);
        self.append(h, path, None, b"");
        self
    }
    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Tar {
        let h = Tar::header(kind, 0);
        self.append(h, path, Some(target), b"");
        self
    }
    fn device(&mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Tar {
        let mut h = Tar::header(kind, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.append(h, path, None, b"");
        self
    }
}

/// Every name under `root`, relative, sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

/// The object a stub the fake wrote points at (by full name or by alias).
fn object_of(rig: &Rig, stub: &Path) -> Digest {
    let target = stub_target(rig.store.sys(), stub).unwrap().expect("a stub");
    rig.store
        .resolve(&target)
        .unwrap()
        .expect("a stored object")
}

fn hostile(r: Result<Applied, ApplyFailure>) -> &'static str {
    match r {
        Err(ApplyFailure {
            error: UnpackError::Store(CasError::Hostile { reason, .. }),
            ..
        }) => reason,
        other => panic!("expected a hostile entry, got {other:?}"),
    }
}

#[test]
fn names_never_leave_the_layer() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.file("../../etc/passwd", b"root:x:0:0")
            .dir("a/../../b")
            .file("./c/./d", b"d")
            .dir("/");
    });
    let applied = r.unwrap();
    assert_eq!(tree(&fs_dir), ["b", "c", "c/d", "etc", "etc/passwd"]);
    assert_eq!(applied.stats.files, 2);
    // nothing beside the layer directory but its manifest
    let mut beside: Vec<_> = fs::read_dir(fs_dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    beside.sort();
    assert_eq!(beside, ["fs", "manifest"]);
    let stub = fs_dir.join("etc/passwd");
    assert_eq!(object_of(&rig, &stub), Digest::of(b"root:x:0:0"));
    assert_eq!(
        fs::metadata(&stub).unwrap().len(),
        10,
        "a stub keeps the size"
    );
}

#[test]
fn symlinked_parents_resolve_inside_the_layer() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.dir("etc")
            .link(tar::EntryType::Symlink, "abs", "/etc")
            .link(tar::EntryType::Symlink, "up", "../../../..")
            .file("abs/passwd", b"p")
            .file("up/top", b"t");
    });
    r.unwrap();
    // "/etc" is the layer's etc, "../../../.." the layer root
    assert!(fs_dir.join("etc/passwd").is_file());
    assert!(fs_dir.join("top").is_file());
    // the symlinks themselves stay as archived
    assert_eq!(
        fs::read_link(fs_dir.join("abs")).unwrap(),
        Path::new("/etc")
    );

    let (_, r) = rig.apply(|t| {
        t.link(tar::EntryType::Symlink, "l1", "l2")
            .link(tar::EntryType::Symlink, "l2", "l1")
            .file("l1/f", b"x");
    });
    assert_eq!(hostile(r), "too many levels of symbolic links in the path");
}

#[test]
fn whiteouts_and_opaque_markers() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.dir("d")
            .file("d/.wh.gone", b"")
            .file("o/.wh..wh..opq", b"")
            .file("x/.wh..wh.plnk", b"");
    });
    r.unwrap();
    let calls = rig.sys.calls();
    assert!(
        calls.contains(&Call::Mknod(fs_dir.join("d/gone"), SFlag::S_IFCHR, 0)),
        "{calls:?}"
    );
    assert!(calls.contains(&Call::SetTrusted(
        fs_dir.join("o"),
        XATTR_OPAQUE.into(),
        b"y".to_vec()
    )));
    // a reserved name is skipped, but its directory is made (as containerd does)
    assert_eq!(tree(&fs_dir), ["d", "d/gone", "o", "x"]);
}

#[test]
fn hardlinks_name_earlier_entries_of_the_layer() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.file("f", b"shared")
            .link(tar::EntryType::Link, "g", "f")
            .link(tar::EntryType::Link, "sub/h", "../../f");
    });
    let applied = r.unwrap();
    let ino = |p: &str| fs::symlink_metadata(fs_dir.join(p)).unwrap().ino();
    assert_eq!(ino("f"), ino("g"));
    assert_eq!(ino("f"), ino("sub/h"));
    // every name in the manifest, the bytes counted once
    assert_eq!(applied.stats.files, 3);
    assert_eq!(applied.stats.logical_bytes, 6);
    let names: Vec<_> = crate::manifest::read_manifest(&fs_dir.parent().unwrap().join("manifest"))
        .unwrap()
        .map(|e| e.unwrap().path.display().to_string())
        .collect();
    assert_eq!(names, ["f", "g", "sub/h"]);

    for (target, why) in [
        ("missing", "not earlier"),
        ("etc", "a directory"),
        ("", "the root"),
    ] {
        let (_, r) = rig.apply(|t| {
            t.dir("etc").link(tar::EntryType::Link, "l", target);
        });
        assert_eq!(
            hostile(r),
            "hardlink to an entry that is not earlier in the same layer",
            "{why}"
        );
    }
}

#[test]
fn later_entries_replace_earlier_ones() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.file("a", b"file first")
            .dir("a")
            .dir("b")
            .file("b/child", b"c")
            .file("b", b"file now")
            .file("c", b"one")
            .file("c", b"two")
            .file("s", b"file")
            .link(tar::EntryType::Symlink, "s", "elsewhere")
            .dir("m")
            .file("m/kept", b"k")
            .dir("m");
    });
    r.unwrap();
    assert!(fs_dir.join("a").is_dir());
    assert!(fs_dir.join("b").is_file());
    assert_eq!(object_of(&rig, &fs_dir.join("b")), Digest::of(b"file now"));
    assert_eq!(object_of(&rig, &fs_dir.join("c")), Digest::of(b"two"));
    assert!(fs::symlink_metadata(fs_dir.join("s"))
        .unwrap()
        .file_type()
        .is_symlink());
    // a directory over a directory merges: what the first held stays
    assert!(fs_dir.join("m/kept").is_file());
    assert_eq!(tree(&fs_dir), ["a", "b", "c", "m", "m/kept", "s"]);
}

#[test]
fn devices_owners_and_redirects_go_through_the_seam() {
    let mut rig = Rig::new();
    let (fs_dir, r) = rig.apply(|t| {
        t.device(tar::EntryType::Char, "dev/null", 1, 3)
            .device(tar::EntryType::Block, "dev/loop0", 7, 0)
            .device(tar::EntryType::Fifo, "run/fifo", 0, 0)
            .owned_file("home/u/f", b"mine", 1000);
    });
    r.unwrap();
    let calls = rig.sys.calls();
    let dev = nix::sys::stat::makedev;
    for expected in [
        Call::Mknod(fs_dir.join("dev/null"), SFlag::S_IFCHR, dev(1, 3)),
        Call::Mknod(fs_dir.join("dev/loop0"), SFlag::S_IFBLK, dev(7, 0)),
        Call::Mknod(fs_dir.join("run/fifo"), SFlag::S_IFIFO, 0),
        Call::Chown(fs_dir.join("home/u/f"), 1000, 1000),
    ] {
        assert!(calls.contains(&expected), "{expected:?} in {calls:?}");
    }
    // the stub got both overlay xattrs through the seam, and nothing else did
    let stub = fs_dir.join("home/u/f");
    let trusted: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            Call::SetTrusted(p, n, _) if p == &stub => Some(n.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(trusted, [crate::stub::XATTR_METACOPY, XATTR_REDIRECT]);
    assert!(xattr::get(&stub, XATTR_REDIRECT)
        .unwrap_or_default()
        .is_none());
}

#[test]
fn stubs_follow_the_redirect_when_a_planned_alias_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let layout = crate::Layout::ensure(dir.path()).unwrap();
    let sys = Arc::new(Recorder::new(true));
    let store = ObjectStore::new(&layout)
        .with_aliases(true)
        .with_syscalls(sys.clone());
    let pool = Pool::start(&ringio::PoolConfig::default()).unwrap();
    let (fs_dir, manifest, tmp) = (
        dir.path().join("fs"),
        dir.path().join("manifest"),
        layout.tmp_dir(),
    );
    fs::create_dir(&fs_dir).unwrap();
    let target = Target {
        store: &store,
        tmp_dir: &tmp,
        fs_dir: &fs_dir,
        lowers: &[],
        manifest: &manifest,
        image: None,
        pool: &pool,
    };
    let mut u = Unpacker::new(&target, StubThreads::none()).unwrap();
    let meta = FileMeta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: 4,
        atime: TimeSpec::new(0, 0),
        mtime: TimeSpec::new(0, 0),
    };
    let digest = Digest::of(b"data");
    let planned = u.write_object(digest, b"data".to_vec()).unwrap();
    assert_eq!(planned, Redirect::Alias(digest));
    let ino = write_stub(&*sys, &fs_dir.join("s"), &meta, &[], &planned).unwrap();
    u.alias_stubs
        .get_mut(&digest)
        .unwrap()
        .push(("s".into(), ino));
    u.flush().unwrap();
    assert_eq!(u.stats.new_objects, 1);
    // As if another object had taken the alias before the pool linked it.
    let alias = store.alias_path(&digest.alias());
    fs::remove_file(&alias).unwrap();
    fs::write(&alias, b"other").unwrap();
    let settled = u
        .settle_redirect(&digest, &planned, &[("s".into(), ino)])
        .unwrap();
    assert_eq!(settled, Redirect::Full(digest));
    assert_eq!(
        crate::stub::stub_target(&*sys, &fs_dir.join("s")).unwrap(),
        Some(crate::stub::StubTarget::Object(digest))
    );
    u.abandon();
}

#[test]
fn limits_scale_with_the_blob() {
    let l = Limits {
        max_bytes: 10_000,
        max_ratio: 10,
        ratio_floor: 100,
    };
    assert_eq!(l.allowed(1), 100);
    assert_eq!(l.allowed(50), 500);
    assert_eq!(l.allowed(5_000), 10_000);
}
