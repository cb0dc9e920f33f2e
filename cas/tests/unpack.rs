//! The fast path's unpack, against real files: a tar built here, compressed three ways,
//! applied into a store; then corrupt, truncated, mislabelled, hostile and bomb blobs.
//! Needs root (device nodes, ownership, `trusted.*` xattrs); skipped otherwise.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cas::objects::ObjectStore;
use cas::stub::{stub_target, XATTR_REDIRECT};
use cas::unpack::{apply_blob, Applied, ApplyFailure, Limits, Target, UnpackError, XATTR_OPAQUE};
use cas::{Digest, Layout};
use ringio::pool::{BackendChoice, Pool, PoolConfig};

/// The tests here are ignored unless asked for (`make unit`); asked for without root,
/// they fail saying why.
fn root() -> bool {
    assert!(
        nix::unistd::geteuid().is_root(),
        "unpack tests need root (mknod, chown, trusted.* xattrs)"
    );
    true
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_600_000_000);
    h
}

struct Layer {
    tar: Vec<u8>,
    big: Vec<u8>,
}

/// A layer with every kind of entry the format has.
fn layer() -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, h: &mut tar::Header, data: &[u8]| {
        b.append_data(h, name, data).unwrap();
    };
    add(
        "etc/",
        &mut header(tar::EntryType::Directory, 0, 0o755),
        &[],
    );
    add(
        "etc/a",
        &mut header(tar::EntryType::Regular, 5, 0o644),
        b"hello",
    );
    add(
        "etc/b",
        &mut header(tar::EntryType::Regular, 5, 0o4755),
        b"hello",
    );
    add("empty", &mut header(tar::EntryType::Regular, 0, 0o600), &[]);
    let big = pseudo_random(20 << 20, 7);
    add(
        "big",
        &mut header(tar::EntryType::Regular, big.len() as u64, 0o644),
        &big,
    );
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    h.set_link_name("etc/a").unwrap();
    add("lnk", &mut h, &[]);
    let mut h = header(tar::EntryType::Link, 0, 0o644);
    h.set_link_name("etc/a").unwrap();
    add("etc/c", &mut h, &[]);
    add(
        ".wh.gone",
        &mut header(tar::EntryType::Regular, 0, 0o600),
        &[],
    );
    add(
        "opq/.wh..wh..opq",
        &mut header(tar::EntryType::Regular, 0, 0o600),
        &[],
    );
    add("fifo", &mut header(tar::EntryType::Fifo, 0, 0o640), &[]);
    // escapes are cleaned against the layer root
    let mut h = header(tar::EntryType::Regular, 3, 0o644);
    h.as_old_mut().name[..15].copy_from_slice(b"../../escape\0\0\0");
    h.set_cksum();
    b.append(&h, &b"out"[..]).unwrap();
    // xattrs arrive as PAX records; trusted.* ones are skipped
    b.append_pax_extensions([
        ("SCHILY.xattr.user.note", &b"kept"[..]),
        ("SCHILY.xattr.trusted.overlay.redirect", &b"/elsewhere"[..]),
        ("mtime", &b"1600000000.25"[..]),
    ])
    .unwrap();
    let mut h = header(tar::EntryType::Regular, 4, 0o644);
    b.append_data(&mut h, "x", &b"data"[..]).unwrap();
    Layer {
        tar: b.into_inner().unwrap(),
        big,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

struct Store {
    layout: Layout,
    store: ObjectStore,
    pool: Pool,
    n: u32,
    /// Layers become EROFS images (mounted at their `fs` once applied), not stub trees.
    images: bool,
    mounted: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Store {
    fn drop(&mut self) {
        for m in &self.mounted {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Store {
    fn with(backend: BackendChoice, images: bool) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(dir.path()).unwrap();
        Store {
            images,
            mounted: Vec::new(),
            store: ObjectStore::new(&layout),
            layout,
            _dir: dir,
            pool: Pool::start(&PoolConfig {
                backend,
                ..PoolConfig::default()
            })
            .unwrap(),
            n: 0,
        }
    }

    /// Applies `blob` into a fresh layer directory; returns it and the result.
    fn apply(
        &mut self,
        blob: &[u8],
        digest: Option<Digest>,
        limits: Limits,
    ) -> (PathBuf, Result<Applied, ApplyFailure>) {
        self.n += 1;
        let dir = self.layout.snapshot_dir(self.n as u64);
        fs::create_dir_all(dir.join("fs")).unwrap();
        let fs_dir = dir.join("fs");
        let manifest = dir.join("manifest");
        let image = dir.join("layer.erofs");
        let tmp = self.layout.tmp_dir();
        let target = Target {
            store: &self.store,
            tmp_dir: &tmp,
            fs_dir: &fs_dir,
            lowers: &[],
            manifest: &manifest,
            image: self.images.then_some(image.as_path()),
            pool: &self.pool,
        };
        let r = apply_blob(blob, blob.len() as u64, digest, limits, &target);
        if self.images && r.is_ok() {
            nix::mount::mount(
                Some(&image),
                &fs_dir,
                Some("erofs"),
                nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .expect("mounting the layer's image");
            self.mounted.push(fs_dir);
        }
        (dir, r)
    }

    fn tmp_is_empty(&self) -> bool {
        fs::read_dir(self.layout.tmp_dir())
            .unwrap()
            .next()
            .is_none()
    }
}

fn check_tree(store: &Store, dir: &Path, layer: &Layer) {
    let fs_dir = dir.join("fs");
    let read_obj = |p: &str| {
        let t = stub_target(&cas::sys::Host, &fs_dir.join(p))
            .unwrap()
            .expect("a stub");
        let d = match t {
            cas::stub::StubTarget::Object(d) => d,
            cas::stub::StubTarget::Alias(a) => {
                let ino = fs::metadata(store.store.alias_path(&a)).unwrap().ino();
                let hello = Digest::of(b"hello");
                let candidates = [
                    hello,
                    Digest::of(&layer.big),
                    Digest::of(b"out"),
                    Digest::of(b"data"),
                ];
                *candidates
                    .iter()
                    .find(|d| fs::metadata(store.store.path(d)).map(|m| m.ino()).ok() == Some(ino))
                    .expect("alias of a known object")
            }
        };
        fs::read(store.store.path(&d)).unwrap()
    };
    assert_eq!(read_obj("etc/a"), b"hello");
    assert_eq!(read_obj("big"), layer.big);
    assert_eq!(read_obj("escape"), b"out");
    let a = fs::metadata(fs_dir.join("etc/a")).unwrap();
    assert_eq!(
        (a.len(), a.uid(), a.gid(), a.mode() & 0o7777),
        (5, 1000, 1001, 0o644)
    );
    if store.images {
        assert!(
            fs::metadata(dir.join("layer.erofs")).unwrap().len() <= 16 << 10,
            "an image holds no data"
        );
    } else {
        assert_eq!(a.blocks(), 0, "a stub holds no data");
    }
    assert_eq!(a.mtime(), 1_600_000_000);
    let b = fs::metadata(fs_dir.join("etc/b")).unwrap();
    assert_eq!(b.mode() & 0o7777, 0o4755, "set-id bits survive the chown");
    let c = fs::metadata(fs_dir.join("etc/c")).unwrap();
    assert_eq!(c.ino(), a.ino(), "hardlinks stay hardlinks");
    let e = fs::metadata(fs_dir.join("empty")).unwrap();
    assert!(e.is_file() && e.len() == 0);
    assert!(xattr::get(fs_dir.join("empty"), XATTR_REDIRECT)
        .unwrap()
        .is_none());
    assert_eq!(
        fs::read_link(fs_dir.join("lnk")).unwrap(),
        PathBuf::from("etc/a")
    );
    let w = fs::symlink_metadata(fs_dir.join("gone")).unwrap();
    assert!(w.file_type().is_char_device() && w.rdev() == 0, "whiteout");
    assert_eq!(
        xattr::get(fs_dir.join("opq"), XATTR_OPAQUE).unwrap(),
        Some(b"y".to_vec())
    );
    assert!(fs::symlink_metadata(fs_dir.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let x = fs_dir.join("x");
    assert_eq!(xattr::get(&x, "user.note").unwrap(), Some(b"kept".to_vec()));
    let redirect = xattr::get(&x, XATTR_REDIRECT).unwrap().unwrap();
    assert_ne!(
        redirect, b"/elsewhere",
        "an archive's overlay xattr is never honoured"
    );
    let xm = fs::metadata(&x).unwrap();
    assert_eq!((xm.mtime(), xm.mtime_nsec()), (1_600_000_000, 250_000_000));
    assert_eq!(
        fs::metadata(fs_dir.join("etc")).unwrap().mtime(),
        1_600_000_000
    );

    let manifest: BTreeMap<PathBuf, (Digest, u64)> =
        cas::manifest::read_manifest(&dir.join("manifest"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.path, (e.digest, e.size)))
            .collect();
    let hello = (Digest::of(b"hello"), 5);
    let expect: BTreeMap<PathBuf, (Digest, u64)> = [
        ("big", (Digest::of(&layer.big), layer.big.len() as u64)),
        ("escape", (Digest::of(b"out"), 3)),
        ("etc/a", hello),
        ("etc/b", hello),
        ("etc/c", hello),
        ("x", (Digest::of(b"data"), 4)),
    ]
    .into_iter()
    .map(|(p, v)| (PathBuf::from(p), v))
    .collect();
    assert_eq!(manifest, expect);
}

fn apply_three_ways(backend: BackendChoice, images: bool) {
    if !root() {
        return;
    }
    let layer = layer();
    let diff_id = Digest::of(&layer.tar);
    let mut s = Store::with(backend, images);
    let mut first = true;
    for blob in [gzip(&layer.tar), zstd(&layer.tar), layer.tar.clone()] {
        let (dir, r) = s.apply(&blob, Some(Digest::of(&blob)), Limits::default());
        let applied = r.map_err(|f| f.error).unwrap();
        assert_eq!(applied.diff_id, diff_id);
        assert_eq!(applied.uncompressed_size, layer.tar.len() as u64);
        assert_eq!(applied.stats.files, 6);
        assert_eq!(
            applied.stats.logical_bytes,
            5 + 5 + 3 + 4 + layer.big.len() as u64
        );
        if first {
            assert_eq!(applied.stats.new_objects, 4);
            assert_eq!(applied.stats.new_bytes, 5 + 3 + 4 + layer.big.len() as u64);
        } else {
            // the same layer again writes nothing new (the big file's stream is dropped)
            assert_eq!(applied.stats.new_objects, 0);
            assert_eq!(applied.stats.new_bytes, 0);
            assert_eq!(applied.stats.discarded_bytes, layer.big.len() as u64);
        }
        assert_eq!(applied.stats.skipped_xattrs, 1);
        first = false;
        check_tree(&s, &dir, &layer);
        assert!(s.tmp_is_empty());
    }
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn applies_gzip_zstd_and_plain_layers_threads() {
    apply_three_ways(BackendChoice::Threads, false);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn applies_gzip_zstd_and_plain_layers_as_images() {
    apply_three_ways(BackendChoice::Auto, true);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn applies_gzip_zstd_and_plain_layers_auto() {
    apply_three_ways(BackendChoice::Auto, false);
}

fn expect_failure(
    s: &mut Store,
    blob: &[u8],
    digest: Option<Digest>,
    limits: Limits,
) -> (PathBuf, UnpackError) {
    let (dir, r) = s.apply(blob, digest, limits);
    let f = r.expect_err("the apply must fail");
    assert!(s.tmp_is_empty(), "no temporary file is left: {:?}", f.error);
    assert!(
        !dir.join("manifest").exists(),
        "no manifest after a failure"
    );
    assert!(!dir.join("manifest.tmp").exists());
    // the objects it published are reported for collection
    for d in &f.new_objects {
        assert!(s.store.contains(d));
    }
    (dir, f.error)
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn bad_blobs_fail_clearly_and_leave_nothing_behind() {
    bad_blobs_fail_clearly_and_leave_nothing_behind_in(false);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn bad_blobs_fail_clearly_and_leave_nothing_behind_as_images() {
    bad_blobs_fail_clearly_and_leave_nothing_behind_in(true);
}

fn bad_blobs_fail_clearly_and_leave_nothing_behind_in(images: bool) {
    if !root() {
        return;
    }
    let layer = layer();
    let mut s = Store::with(BackendChoice::Auto, images);
    let good = gzip(&layer.tar);

    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    let (_, e) = expect_failure(&mut s, &corrupt, Some(Digest::of(&good)), Limits::default());
    // damaged after it was fetched: the digest says so, whatever the decoder made of it
    assert!(matches!(e, UnpackError::BlobDigest { .. }), "{e}");
    // the same corruption in a blob whose digest is its own: the stream is the cause
    let (_, e) = expect_failure(
        &mut s,
        &corrupt,
        Some(Digest::of(&corrupt)),
        Limits::default(),
    );
    assert!(
        matches!(e, UnpackError::Decompress { .. } | UnpackError::Tar(_)),
        "{e}"
    );

    let truncated = &good[..good.len() / 3];
    let (_, e) = expect_failure(&mut s, truncated, None, Limits::default());
    assert!(
        matches!(e, UnpackError::Decompress { .. } | UnpackError::Tar(_)),
        "{e}"
    );

    // right bytes, wrong descriptor
    let (_, e) = expect_failure(&mut s, &good, Some(Digest::of(b"other")), Limits::default());
    assert!(matches!(e, UnpackError::BlobDigest { .. }), "{e}");

    // a bomb: 64 MiB of zeros in a tiny blob
    let mut b = tar::Builder::new(Vec::new());
    let zeros = vec![0u8; 64 << 20];
    b.append_data(
        &mut header(tar::EntryType::Regular, zeros.len() as u64, 0o644),
        "zeros",
        &zeros[..],
    )
    .unwrap();
    let bomb = zstd(&b.into_inner().unwrap());
    assert!(bomb.len() < 64 << 10);
    let limits = Limits {
        max_bytes: 1 << 40,
        max_ratio: 100,
        ratio_floor: 16 << 20,
    };
    let (_, e) = expect_failure(&mut s, &bomb, None, limits);
    assert!(matches!(e, UnpackError::Expansion { .. }), "{e}");

    // a hardlink to something that is not in the layer
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Link, 0, 0o644);
    h.set_link_name("etc/shadow").unwrap();
    b.append_data(&mut h, "innocent", &[][..]).unwrap();
    let hostile = gzip(&b.into_inner().unwrap());
    let (_, e) = expect_failure(&mut s, &hostile, None, Limits::default());
    assert!(
        matches!(e, UnpackError::Store(cas::CasError::Hostile { .. })),
        "{e}"
    );

    // a whiteout naming its own directory or the one above: refused, nothing cleared
    for name in [".wh..", "d/.wh..."] {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(
            &mut header(tar::EntryType::Regular, 0, 0o644),
            name,
            &[][..],
        )
        .unwrap();
        let (dir, e) = expect_failure(
            &mut s,
            &gzip(&b.into_inner().unwrap()),
            None,
            Limits::default(),
        );
        assert!(
            matches!(e, UnpackError::Store(cas::CasError::Hostile { .. })),
            "{name}: {e}"
        );
        assert!(
            dir.join("fs").is_dir(),
            "{name}: the layer directory is still there"
        );
    }

    // not a tar at all
    let (_, e) = expect_failure(
        &mut s,
        &gzip(&pseudo_random(10_000, 3)),
        None,
        Limits::default(),
    );
    assert!(matches!(e, UnpackError::Tar(_)), "{e}");
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn symlinked_parents_resolve_inside_the_layer() {
    symlinked_parents_resolve_inside_the_layer_in(false);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn symlinked_parents_resolve_inside_the_layer_as_images() {
    symlinked_parents_resolve_inside_the_layer_in(true);
}

fn symlinked_parents_resolve_inside_the_layer_in(images: bool) {
    if !root() {
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    h.set_link_name("/../../tmp").unwrap();
    b.append_data(&mut h, "up", &[][..]).unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 4, 0o644),
        "up/file",
        &b"data"[..],
    )
    .unwrap();
    let blob = gzip(&b.into_inner().unwrap());
    let mut s = Store::with(BackendChoice::Auto, images);
    let (dir, r) = s.apply(&blob, None, Limits::default());
    r.map_err(|f| f.error).unwrap();
    // `up` points at /tmp of the layer, never of the host
    assert!(dir.join("fs/tmp/file").is_file());
    assert!(!Path::new("/tmp/file").exists() || fs::read("/tmp/file").unwrap() != b"data");
}

/// A file replacing a directory the layer made implicitly (for a deeper entry) removes
/// it, and a later entry under it fails as on any path through a file: the same whether
/// the stubs are made on this thread or on the stub threads.
#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn a_file_over_an_implicit_directory_replaces_it() {
    a_file_over_an_implicit_directory_replaces_it_in(false);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn a_file_over_an_implicit_directory_replaces_it_as_images() {
    a_file_over_an_implicit_directory_replaces_it_in(true);
}

fn a_file_over_an_implicit_directory_replaces_it_in(images: bool) {
    if !root() {
        return;
    }
    let layer = |names: &[&str]| {
        let mut b = tar::Builder::new(Vec::new());
        for n in names {
            let data = n.as_bytes();
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
            b.append_data(&mut h, n, data).unwrap();
        }
        gzip(&b.into_inner().unwrap())
    };
    let mut s = Store::with(BackendChoice::Auto, images);
    let (dir, r) = s.apply(&layer(&["i/j/f", "i"]), None, Limits::default());
    r.map_err(|f| f.error).unwrap();
    assert!(fs::symlink_metadata(dir.join("fs/i")).unwrap().is_file());
    let (_, r) = s.apply(&layer(&["i/j/f", "i", "i/j/k"]), None, Limits::default());
    let err = r.expect_err("an entry under a file").error;
    assert!(
        matches!(err, UnpackError::Store(cas::CasError::Hostile { .. })),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn later_entries_replace_earlier_ones() {
    later_entries_replace_earlier_ones_in(false);
}

#[test]
#[ignore = "needs root: mknod, chown, trusted.* xattrs (make unit runs it)"]
fn later_entries_replace_earlier_ones_as_images() {
    later_entries_replace_earlier_ones_in(true);
}

fn later_entries_replace_earlier_ones_in(images: bool) {
    if !root() {
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    // `data` is a link's target for symlinks and hardlinks, the content otherwise
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        if matches!(kind, Symlink | Link) {
            let mut h = header(kind, 0, mode);
            h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
            b.append_data(&mut h, name, &[][..]).unwrap();
        } else {
            let mut h = header(kind, data.len() as u64, mode);
            b.append_data(&mut h, name, data).unwrap();
        }
    };
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    // a file, then a directory of the same name
    add("a", Regular, 0o644, b"file a");
    add("a/", Directory, 0o750, &[]);
    add("a/in", Regular, 0o644, b"inside a");
    // a directory tree, then a file of the same name
    add("b/", Directory, 0o755, &[]);
    add("b/x", Regular, 0o644, b"gone with b");
    add("b", Regular, 0o600, b"file b");
    // the same file twice: the second wins
    add("c", Regular, 0o644, b"first c");
    add("c", Regular, 0o666, b"second c");
    // a symlink, then a file; an empty file, then a stub
    add("d", Symlink, 0o777, b"a");
    add("d", Regular, 0o2755, b"file d");
    add("e", Regular, 0o644, &[]);
    add("e", Regular, 0o1644, b"file e");
    // a whiteout over a file of this layer
    add("f", Regular, 0o644, b"file f");
    add(".wh.f", Regular, 0o644, &[]);
    // a whiteout over a directory of this layer and the files in it
    add("w/", Directory, 0o755, &[]);
    add("w/1", Regular, 0o644, b"w1");
    add("w/2", Regular, 0o644, b"w2");
    add(".wh.w", Regular, 0o644, &[]);
    // a hardlink to the file just before it
    add("g", Regular, 0o640, b"file g");
    add("h", Link, 0o640, b"g");
    let blob = gzip(&b.into_inner().unwrap());
    let mut s = Store::with(BackendChoice::Auto, images);
    let (dir, r) = s.apply(&blob, None, Limits::default());
    let applied = r.map_err(|f| f.error).unwrap();
    let fs_dir = dir.join("fs");
    let md = |p: &str| fs::symlink_metadata(fs_dir.join(p)).unwrap();
    let object = |p: &str| {
        let d = match stub_target(&cas::sys::Host, &fs_dir.join(p))
            .unwrap()
            .expect("a stub")
        {
            cas::stub::StubTarget::Object(d) => fs::read(s.store.path(&d)).unwrap(),
            cas::stub::StubTarget::Alias(a) => fs::read(s.store.alias_path(&a)).unwrap(),
        };
        String::from_utf8(d).unwrap()
    };
    assert!(md("a").is_dir() && md("a").mode() & 0o7777 == 0o750);
    assert_eq!(object("a/in"), "inside a");
    assert!(md("b").is_file() && md("b").mode() & 0o7777 == 0o600);
    assert_eq!(object("b"), "file b");
    assert_eq!(object("c"), "second c");
    assert_eq!(
        md("c").mode() & 0o7777,
        0o666,
        "the mode, whatever the umask"
    );
    assert!(md("d").is_file());
    assert_eq!(
        md("d").mode() & 0o7777,
        0o2755,
        "set-id bits after the chown"
    );
    assert_eq!(object("d"), "file d");
    assert_eq!(object("e"), "file e");
    assert_eq!(md("e").mode() & 0o7777, 0o1644);
    for p in ["a", "a/in", "b", "c", "d", "e"] {
        let m = md(p);
        assert_eq!((m.uid(), m.gid()), (1000, 1001), "{p}");
        assert_eq!(m.mtime(), 1_600_000_000, "{p}");
    }
    assert!(md("f").file_type().is_char_device() && md("f").rdev() == 0);
    assert!(md("w").file_type().is_char_device() && md("w").rdev() == 0);
    assert_eq!(md("g").ino(), md("h").ino());
    assert_eq!(object("h"), "file g");
    let manifest: BTreeMap<PathBuf, u64> = cas::manifest::read_manifest(&dir.join("manifest"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.path, e.size))
        .collect();
    // one line per stub written, replaced names included (as at Commit: paths are keys)
    assert_eq!(manifest[&PathBuf::from("c")], 8);
    assert_eq!(manifest[&PathBuf::from("h")], 6);
    assert_eq!(applied.stats.entries, 20);
    assert!(s.tmp_is_empty());
}
