//! The snapshotter against a real store and real overlayfs mounts (needs root; skips
//! otherwise): dedup, stubs read back exactly, copy-up leaves objects alone, hostile
//! overlay xattrs are not honoured, GC empties the store, a deleted or corrupted index
//! rebuilds to the same state.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cas_snapshotter::service::CasSnapshotter;
use config::MountMode;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::Snapshotter;
use futures::StreamExt;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Mounts what the snapshotter returned, as containerd would; unmounts on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(mounts: &[Mount], target: &Path) -> Mounted {
        fs::create_dir_all(target).unwrap();
        let m = &mounts[0];
        if m.r#type == "bind" {
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                flags,
                None::<&str>,
            )
            .unwrap();
            if m.options.iter().any(|o| o == "ro") {
                flags |= MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                mount(None::<&str>, target, None::<&str>, flags, None::<&str>).unwrap();
            }
        } else {
            let data = m.options.join(",");
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .unwrap_or_else(|e| panic!("mount overlay {data}: {e}"));
        }
        Mounted(target.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A test's directory. On drop, whatever is still mounted below it (the layers' images a
/// test's last store left mounted, as a killed daemon would) is detached first, so that
/// nothing outlives the test.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut points = mounts_below(self.0.path());
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = umount2(p.as_str(), MntFlags::MNT_DETACH);
        }
    }
}

fn labels() -> HashMap<String, String> {
    HashMap::new()
}

fn set_mtime(p: &Path, secs: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(
        None,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

async fn open(root: &Path) -> CasSnapshotter {
    open_in(root, MountMode::Auto).await
}

async fn open_in(root: &Path, mode: MountMode) -> CasSnapshotter {
    CasSnapshotter::open(cas::Layout::ensure(root).unwrap(), mode).unwrap()
}

fn fs_of(root: &Path, mounts: &[Mount]) -> PathBuf {
    // the upperdir (or bind source) of an active snapshot: where containerd's applier writes
    let m = &mounts[0];
    if m.r#type == "bind" {
        return PathBuf::from(&m.source);
    }
    let up = m
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    assert!(up.starts_with(root.to_str().unwrap()));
    PathBuf::from(up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn cas_round_trip_dedup_copy_up_hostile_gc_and_rebuild() {
    round_trip(MountMode::Auto).await;
}

/// The same in the materialised mode kernels without data-only lower layers get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn materialised_round_trip() {
    round_trip(MountMode::Materialised).await;
}

async fn round_trip(mode: MountMode) {
    assert!(is_root(), "needs root for overlay mounts");
    let tmp = Scratch::new();
    let root = tmp.path().join("root");
    let mnt = tmp.path().join("mnt");
    let sn = open_in(&root, mode).await;
    let big = vec![42u8; 3 << 20];

    // Layer 1 (parentless, bind mount): duplicate content, hardlinks, odd metadata.
    let m = sn
        .prepare("l1-active".into(), String::new(), labels())
        .await
        .unwrap();
    let up = fs_of(&root, &m);
    fs::write(up.join("a"), &big).unwrap();
    fs::write(up.join("b"), &big).unwrap();
    fs::hard_link(up.join("a"), up.join("c")).unwrap();
    fs::write(up.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("a", up.join("link")).unwrap();
    fs::create_dir(up.join("dir")).unwrap();
    fs::write(up.join("dir/small"), b"small file\n").unwrap();
    xattr::set(up.join("a"), "user.fixture", b"hello").unwrap();
    nix::unistd::chown(&up.join("a"), Some(1000.into()), Some(1000.into())).unwrap();
    fs::set_permissions(up.join("a"), fs::Permissions::from_mode(0o4755)).unwrap();
    set_mtime(&up.join("a"), 1_000_000);
    set_mtime(&up.join("dir"), 2_000_000);
    sn.commit("l1".into(), "l1-active".into(), labels())
        .await
        .unwrap();

    // Layer 2 (overlay): a whiteout, a duplicate of layer 1's content, new content.
    let m = sn
        .prepare("l2-active".into(), "l1".into(), labels())
        .await
        .unwrap();
    let up = fs_of(&root, &m);
    nix::sys::stat::mknod(
        &up.join("b"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    fs::write(up.join("e"), &big).unwrap();
    fs::write(up.join("f"), b"layer two\n").unwrap();
    sn.commit("l2".into(), "l2-active".into(), labels())
        .await
        .unwrap();

    let stats = sn.stats().await.unwrap();
    assert_eq!(stats.objects, 3, "{stats:?}");
    // where the kernel mounts EROFS images from files, both layers are images
    let images = stats.new_layers.as_deref() == Some("EROFS images");
    assert_eq!(stats.image_layers, if images { 2 } else { 0 }, "{stats:?}");
    assert!(stats.logical_bytes >= 2 * big.len() as u64, "{stats:?}");
    assert!(stats.physical_bytes < big.len() as u64 + 100, "{stats:?}");

    {
        let v = sn.view("v".into(), "l2".into(), labels()).await.unwrap();
        let _m = Mounted::new(&v, &mnt);
        assert_eq!(fs::read(mnt.join("a")).unwrap(), big);
        assert_eq!(fs::read(mnt.join("e")).unwrap(), big);
        assert!(!mnt.join("b").exists(), "whiteout not honoured");
        assert_eq!(fs::read(mnt.join("dir/small")).unwrap(), b"small file\n");
        let a = fs::symlink_metadata(mnt.join("a")).unwrap();
        assert_eq!(a.mode() & 0o7777, 0o4755);
        assert_eq!((a.uid(), a.gid()), (1000, 1000));
        assert_eq!(a.mtime(), 1_000_000);
        assert_eq!(
            fs::symlink_metadata(mnt.join("dir")).unwrap().mtime(),
            2_000_000
        );
        assert_eq!(
            a.ino(),
            fs::symlink_metadata(mnt.join("c")).unwrap().ino(),
            "hardlink lost"
        );
        assert_eq!(
            xattr::get(mnt.join("a"), "user.fixture").unwrap().unwrap(),
            b"hello"
        );
        assert_eq!(fs::read_link(mnt.join("link")).unwrap(), PathBuf::from("a"));
        assert_eq!(fs::read(mnt.join("empty")).unwrap(), b"");
    }

    // A container writes to and chmods image files: the CAS objects stay as they were.
    let object = root
        .join("cas/objects")
        .join(cas::Digest::of(&big).object_relpath());
    {
        let m = sn
            .prepare("ctr".into(), "l2".into(), labels())
            .await
            .unwrap();
        let _m = Mounted::new(&m, &mnt);
        use std::io::Write;
        fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("a"))
            .unwrap()
            .write_all(b"tail")
            .unwrap();
        fs::set_permissions(mnt.join("e"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fs::read(mnt.join("e")).unwrap(), big);
    }
    assert_eq!(
        fs::read(&object).unwrap(),
        big,
        "copy-up changed a CAS object"
    );
    sn.commit("l3".into(), "ctr".into(), labels())
        .await
        .unwrap();
    {
        let v = sn.view("v3".into(), "l3".into(), labels()).await.unwrap();
        let _m = Mounted::new(&v, &mnt);
        assert_eq!(
            fs::read(mnt.join("e")).unwrap(),
            big,
            "metadata-only copy-up lost its data"
        );
        assert_eq!(
            fs::symlink_metadata(mnt.join("e")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(mnt.join("a")).unwrap().len(), big.len() + 4);
    }

    // A parentless layer that brings its own redirect to another layer's object.
    let m = sn
        .prepare("evil-active".into(), String::new(), labels())
        .await
        .unwrap();
    let up = fs_of(&root, &m);
    fs::write(up.join("steal"), b"zz").unwrap();
    xattr::set(up.join("steal"), "trusted.overlay.metacopy", b"").unwrap();
    xattr::set(
        up.join("steal"),
        "trusted.overlay.redirect",
        cas::Digest::of(&big).redirect().as_bytes(),
    )
    .unwrap();
    sn.commit("evil".into(), "evil-active".into(), labels())
        .await
        .unwrap();
    {
        let v = sn.view("ve".into(), "evil".into(), labels()).await.unwrap();
        let _m = Mounted::new(&v, &mnt);
        assert_eq!(
            fs::read(mnt.join("steal")).unwrap(),
            b"zz",
            "a layer read another layer's object"
        );
    }

    let report = sn.fsck(true).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Rebuild: drop the index, reopen, same snapshots and the store still checks clean.
    let before: Vec<_> = walk(&sn).await;
    drop(sn);
    fs::remove_dir_all(root.join("index")).unwrap();
    let sn = open_in(&root, mode).await;
    assert_eq!(walk(&sn).await, before);
    let report = sn.fsck(false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Corrupt: garbage over every file of the index; the same state comes back.
    drop(sn);
    for e in fs::read_dir(root.join("index")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            fs::write(
                &p,
                b"this is not a sled file, and it is long enough to be read",
            )
            .unwrap();
        }
    }
    let sn = open_in(&root, mode).await;
    assert_eq!(walk(&sn).await, before, "after a corrupted index");
    let report = sn.fsck(false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Remove everything (children first) and collect: only the empty layout is left.
    for key in ["ve", "evil", "v3", "l3", "v", "l2", "l1"] {
        sn.remove(key.into()).await.unwrap();
    }
    sn.clear().await.unwrap();
    let left: Vec<_> = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{left:?} {:?}", walk(&sn).await);
    let left: Vec<_> = fs::read_dir(root.join("cas/tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let st = sn.stats().await.unwrap();
    assert_eq!(st.objects, 0, "{st:?} {:?}", sn.fsck(false).await.unwrap());
    assert_eq!(
        fs::read_dir(root.join("cas/objects")).unwrap().count(),
        0,
        "empty fan-out directories left"
    );
}

async fn walk(sn: &CasSnapshotter) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = sn
        .list(String::new(), vec![])
        .await
        .unwrap()
        .map(|i| {
            let i = i.unwrap();
            (
                i.name,
                i.parent,
                format!("{:?} {:?} {:?}", i.kind, i.created_at, i.labels),
            )
        })
        .collect()
        .await;
    out.sort();
    out
}

fn resident_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "-o", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn meminfo_cached() -> u64 {
    let m = fs::read_to_string("/proc/meminfo").unwrap();
    let line = m.lines().find(|l| l.starts_with("Cached:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Two images that contain the same file, each unpacked on its own: containers of both
/// read it from one object inode, so its bytes are in the page cache once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn two_images_share_one_page_cache_copy() {
    assert!(is_root(), "needs root for overlay mounts");
    let tmp = Scratch::new();
    let root = tmp.path().join("root");
    let sn = open(&root).await;
    // 32 MiB of content that is not all one byte, so nothing could compress or share it
    let big: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for image in ["one", "two"] {
        let m = sn
            .prepare(format!("{image}-base-a"), String::new(), labels())
            .await
            .unwrap();
        let up = fs_of(&root, &m);
        fs::write(up.join(format!("{image}-only")), image).unwrap();
        sn.commit(format!("{image}-base"), format!("{image}-base-a"), labels())
            .await
            .unwrap();
        let m = sn
            .prepare(format!("{image}-app-a"), format!("{image}-base"), labels())
            .await
            .unwrap();
        let up = fs_of(&root, &m);
        fs::create_dir(up.join("opt")).unwrap();
        fs::write(up.join("opt/shared.bin"), &big).unwrap();
        sn.commit(format!("{image}-app"), format!("{image}-app-a"), labels())
            .await
            .unwrap();
    }
    let object = root
        .join("cas/objects")
        .join(cas::Digest::of(&big).object_relpath());
    drop(big);

    let (m1, m2) = (tmp.path().join("c1"), tmp.path().join("c2"));
    let v1 = sn
        .prepare("c1".into(), "one-app".into(), labels())
        .await
        .unwrap();
    let v2 = sn
        .prepare("c2".into(), "two-app".into(), labels())
        .await
        .unwrap();
    let _a = Mounted::new(&v1, &m1);
    let _b = Mounted::new(&v2, &m2);

    // Drop the object's pages, then read the file in container one.
    let f = fs::File::open(&object).unwrap();
    nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    assert!(resident_bytes(&object) < 1 << 20);
    let size = fs::read(m1.join("opt/shared.bin")).unwrap().len() as u64;
    let after_one = resident_bytes(&object);
    assert!(
        after_one >= size * 9 / 10,
        "reading through the overlay did not cache the object inode ({after_one} of {size})"
    );

    // Reading the same file in container two adds (almost) nothing to the page cache.
    let before = meminfo_cached();
    let data = fs::read(m2.join("opt/shared.bin")).unwrap();
    let grown = meminfo_cached().saturating_sub(before);
    assert_eq!(data.len() as u64, size);
    assert!(
        grown < size / 4,
        "page cache grew by {grown} bytes for a {size}-byte file already cached"
    );
    println!("second image's read grew the page cache by {grown} bytes for a {size}-byte file");
}

/// Commits and removes that reuse objects while GC runs in a loop never lose a
/// referenced object: every committed layer still reads back, and fsck is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn gc_racing_commits_and_removes_loses_nothing() {
    assert!(is_root(), "needs root for overlay mounts");
    let tmp = Scratch::new();
    let root = tmp.path().join("root");
    let sn = std::sync::Arc::new(open(&root).await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (sn, stop) = (sn.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sn.gc().await.unwrap();
                runs += 1;
                tokio::task::yield_now().await;
            }
            runs
        })
    };
    let mut workers = Vec::new();
    for w in 0..3 {
        let sn = sn.clone();
        let root = root.clone();
        workers.push(tokio::spawn(async move {
            for round in 0..15 {
                // the same few contents again and again, so objects are constantly
                // dropped to zero references and reused
                let key = format!("w{w}-r{round}");
                let m = sn
                    .prepare(format!("{key}-a"), String::new(), labels())
                    .await
                    .unwrap();
                let up = fs_of(&root, &m);
                for f in 0..4 {
                    fs::write(
                        up.join(format!("f{f}")),
                        format!("content {}", (f + round) % 5),
                    )
                    .unwrap();
                }
                sn.commit(key.clone(), format!("{key}-a"), labels())
                    .await
                    .unwrap();
                if round % 2 == 0 {
                    sn.remove(key).await.unwrap();
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.await.unwrap();
    assert!(runs > 0);
    let report = sn.fsck(true).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // every surviving layer still reads its bytes through overlayfs
    let mnt = tmp.path().join("mnt");
    for w in 0..3 {
        for round in (1..15).step_by(2) {
            let key = format!("w{w}-r{round}");
            let v = sn
                .view(format!("{key}-v"), key.clone(), labels())
                .await
                .unwrap();
            let _m = Mounted::new(&v, &mnt);
            for f in 0..4 {
                let got = fs::read_to_string(mnt.join(format!("f{f}"))).unwrap();
                assert_eq!(got, format!("content {}", (f + round) % 5), "{key} f{f}");
            }
        }
    }
}

/// A store of stub trees (version 1, as earlier releases wrote it) opened where layers
/// become images: its layers stay as they are and serve as parents of image layers, a
/// chain mixing both mounts as one, fsck is clean, and removing everything empties it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn a_store_of_stub_trees_takes_image_layers_above_them() {
    assert!(is_root(), "needs root for overlay mounts");
    let tmp = Scratch::new();
    let root = tmp.path().join("root");
    let mnt = tmp.path().join("mnt");
    let stubs_only = config::StoreConfig {
        layer_metadata: config::LayerMetadata::Stubs,
        ..config::StoreConfig::default()
    };
    let layout = cas::Layout::ensure(&root).unwrap();
    let sn = CasSnapshotter::open_with(layout, &stubs_only).unwrap();
    let m = sn
        .prepare("l1-active".into(), String::new(), labels())
        .await
        .unwrap();
    let up = fs_of(&root, &m);
    fs::create_dir(up.join("etc")).unwrap();
    fs::write(up.join("etc/kept"), b"kept from the stub tree\n").unwrap();
    fs::write(up.join("etc/hidden"), b"whited out above\n").unwrap();
    fs::create_dir(up.join("var")).unwrap();
    fs::write(up.join("var/old"), b"hidden by an opaque directory\n").unwrap();
    sn.commit("l1".into(), "l1-active".into(), labels())
        .await
        .unwrap();
    let st = sn.stats().await.unwrap();
    assert_eq!((st.committed, st.image_layers), (1, 0), "{st:?}");
    // version 5 (buckets in the index, compressed manifests) whatever the layers are
    assert_eq!(fs::read_to_string(root.join("layout")).unwrap().trim(), "5");
    drop(sn);

    let sn = open(&root).await;
    let images = sn.stats().await.unwrap().new_layers.as_deref() == Some("EROFS images");
    if !images {
        eprintln!("this kernel does not mount EROFS images from files: nothing more to check");
        return;
    }
    assert_eq!(fs::read_to_string(root.join("layout")).unwrap().trim(), "5");
    let m = sn
        .prepare("l2-active".into(), "l1".into(), labels())
        .await
        .unwrap();
    {
        // written through the overlay, as a container or containerd's applier would
        let _m = Mounted::new(&m, &mnt);
        fs::write(mnt.join("etc/new"), b"from the image layer\n").unwrap();
        fs::remove_file(mnt.join("etc/hidden")).unwrap();
        fs::remove_dir_all(mnt.join("var")).unwrap();
        fs::create_dir(mnt.join("var")).unwrap();
        fs::write(mnt.join("var/fresh"), b"fresh\n").unwrap();
    }
    sn.commit("l2".into(), "l2-active".into(), labels())
        .await
        .unwrap();
    let st = sn.stats().await.unwrap();
    assert_eq!((st.committed, st.image_layers), (2, 1), "{st:?}");
    let v = sn.view("v".into(), "l2".into(), labels()).await.unwrap();
    let check = |mnt: &Path| {
        assert_eq!(
            fs::read(mnt.join("etc/kept")).unwrap(),
            b"kept from the stub tree\n"
        );
        assert_eq!(
            fs::read(mnt.join("etc/new")).unwrap(),
            b"from the image layer\n"
        );
        assert!(
            !mnt.join("etc/hidden").exists(),
            "the whiteout acts over a stub tree"
        );
        let var: Vec<_> = fs::read_dir(mnt.join("var"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            var,
            ["fresh"],
            "the opaque directory hides the stub tree's entries"
        );
    };
    {
        let _m = Mounted::new(&v, &mnt);
        check(&mnt);
    }
    let report = sn.fsck(true).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // a restart after a clean stop mounts the image again; the chain reads the same
    sn.shutdown().await.unwrap();
    assert!(!cas::erofs::mount::is_mounted(
        &root.join("snapshots").join(image_id(&root)).join("fs")
    ));
    drop(sn);
    let sn = open(&root).await;
    {
        let v = sn.mounts("v".into()).await.unwrap();
        let _m = Mounted::new(&v, &mnt);
        check(&mnt);
    }
    for key in ["v", "l2", "l1"] {
        sn.remove(key.into()).await.unwrap();
    }
    sn.clear().await.unwrap();
    assert_eq!(fs::read_dir(root.join("snapshots")).unwrap().count(), 0);
    assert_eq!(sn.stats().await.unwrap().objects, 0);
}

/// The directory number of the one snapshot whose layer is an image.
fn image_id(root: &Path) -> String {
    fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().join(cas::layout::IMAGE_FILE).exists())
        .expect("an image layer")
        .file_name()
        .into_string()
        .unwrap()
}

fn mapping(host: u32) -> HashMap<String, String> {
    let m = format!("0:{host}:65536");
    HashMap::from([
        (cas::idmap::UID_MAPPING_LABEL.to_string(), m.clone()),
        (cas::idmap::GID_MAPPING_LABEL.to_string(), m),
    ])
}

/// What is mounted below `dir`, from this process's mount table.
fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn owner(p: &Path) -> (u32, u32) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.uid(), md.gid())
}

/// Two user-namespaced containers on one image at once, each with its own mapping:
/// every file shows its mapped owner and the image's bytes, and the store holds no copy
/// of the layers per container. A chain containerd chowned itself is not mapped twice;
/// with ID-mapped layers off, a mapped snapshot over unmapped layers is refused with
/// what to change. Removing the snapshots (or a crash, then Remove) leaves no clone
/// mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: user namespaces and real overlay mounts (make unit runs it)"]
async fn id_mapped_snapshots_share_the_layers() {
    assert!(is_root(), "needs root for ID-mapped mounts");
    let tmp = Scratch::new();
    let root = tmp.path().join("root");
    let (m1, m2) = (tmp.path().join("c1"), tmp.path().join("c2"));
    let sn = open(&root).await;
    let st = sn.stats().await.unwrap();
    let how = st.id_mapped_snapshots.clone().unwrap();
    if !how.contains("remap-ids") {
        eprintln!("layers cannot be ID-mapped here ({how}): nothing more to check");
        return;
    }
    let m = sn
        .prepare("l1-a".into(), String::new(), labels())
        .await
        .unwrap();
    let up = fs_of(&root, &m);
    fs::create_dir(up.join("etc")).unwrap();
    fs::write(up.join("etc/shadow"), b"root:secret\n").unwrap();
    fs::set_permissions(up.join("etc/shadow"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(up.join("home")).unwrap();
    fs::write(up.join("home/user-file"), b"owned by 1000\n").unwrap();
    nix::unistd::chown(
        &up.join("home/user-file"),
        Some(1000.into()),
        Some(1001.into()),
    )
    .unwrap();
    std::os::unix::fs::symlink("shadow", up.join("etc/link")).unwrap();
    sn.commit("l1".into(), "l1-a".into(), labels())
        .await
        .unwrap();
    let m = sn
        .prepare("l2-a".into(), "l1".into(), labels())
        .await
        .unwrap();
    fs::create_dir(fs_of(&root, &m).join("bin")).unwrap();
    fs::write(fs_of(&root, &m).join("bin/app"), b"#!/bin/sh\n").unwrap();
    sn.commit("l2".into(), "l2-a".into(), labels())
        .await
        .unwrap();
    let before = sn.stats().await.unwrap();

    let c1 = sn
        .prepare("c1".into(), "l2".into(), mapping(100_000))
        .await
        .unwrap();
    let c2 = sn
        .prepare("c2".into(), "l2".into(), mapping(200_000))
        .await
        .unwrap();
    {
        let (_a, _b) = (Mounted::new(&c1, &m1), Mounted::new(&c2, &m2));
        for (mnt, host) in [(&m1, 100_000), (&m2, 200_000)] {
            assert_eq!(owner(mnt), (host, host), "the container's root owns /");
            assert_eq!(owner(&mnt.join("etc/shadow")), (host, host));
            assert_eq!(owner(&mnt.join("etc/link")), (host, host));
            assert_eq!(
                owner(&mnt.join("home/user-file")),
                (host + 1000, host + 1001)
            );
            assert_eq!(owner(&mnt.join("bin/app")), (host, host));
            assert_eq!(fs::read(mnt.join("etc/shadow")).unwrap(), b"root:secret\n");
            assert_eq!(
                fs::read(mnt.join("home/user-file")).unwrap(),
                b"owned by 1000\n"
            );
            let mode = fs::metadata(mnt.join("etc/shadow"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o600);
            // a write lands in the container's own upper directory
            fs::write(mnt.join("etc/written"), format!("{host}\n")).unwrap();
        }
        assert_eq!(fs::read(m1.join("etc/written")).unwrap(), b"100000\n");
        assert_eq!(fs::read(m2.join("etc/written")).unwrap(), b"200000\n");
        // the Mounts of a running container name the same clones
        let again = sn.mounts("c1".into()).await.unwrap();
        assert_eq!(again[0].options, c1[0].options);
    }
    // a View takes the mapping too (read-only, no upper)
    let v = sn
        .view("v1".into(), "l2".into(), mapping(500_000))
        .await
        .unwrap();
    {
        let _m = Mounted::new(&v, &m1);
        assert_eq!(owner(&m1.join("etc/shadow")), (500_000, 500_000));
        assert_eq!(owner(&m1.join("home/user-file")), (501_000, 501_001));
    }
    sn.remove("v1".into()).await.unwrap();
    let after = sn.stats().await.unwrap();
    assert_eq!(
        (after.objects, after.physical_bytes, after.committed),
        (before.objects, before.physical_bytes, before.committed),
        "no copy of the layers per container"
    );
    let c1_fs = fs_of(&root, &c1);
    let upper: Vec<_> = walkdir::WalkDir::new(&c1_fs)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(&c1_fs)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        upper,
        ["etc", "etc/written"],
        "the upper holds the write only"
    );
    let clones = mounts_below(&c1_fs.parent().unwrap().join(cas::layout::MAPPED_DIR));
    assert_eq!(clones.len(), 2, "one clone per layer: {clones:?}");
    for key in ["c1", "c2"] {
        sn.remove(key.into()).await.unwrap();
    }
    assert!(
        mounts_below(&root).iter().all(|m| !m.contains("/mapped/")),
        "Remove detaches the clones: {:?}",
        mounts_below(&root)
    );

    // A crash leaves the clones mounted; the next Mounts and Remove find them.
    let c3 = sn
        .prepare("c3".into(), "l2".into(), mapping(300_000))
        .await
        .unwrap();
    drop(sn);
    let sn = open(&root).await;
    assert_eq!(
        sn.mounts("c3".into()).await.unwrap()[0].options,
        c3[0].options
    );
    {
        let _m = Mounted::new(&c3, &m1);
        assert_eq!(owner(&m1.join("etc/shadow")), (300_000, 300_000));
    }
    sn.remove("c3".into()).await.unwrap();
    assert!(mounts_below(&root).iter().all(|m| !m.contains("/mapped/")));

    // containerd's chown path: a layer already owned by the mapped IDs is not mapped
    // again.
    let m = sn
        .prepare("chown-a".into(), "l2".into(), labels())
        .await
        .unwrap();
    {
        let _m = Mounted::new(&m, &m1);
        for e in walkdir::WalkDir::new(&m1) {
            let e = e.unwrap();
            let (u, g) = owner(e.path());
            std::os::unix::fs::lchown(e.path(), Some(u + 100_000), Some(g + 100_000)).unwrap();
        }
    }
    sn.commit("chowned".into(), "chown-a".into(), labels())
        .await
        .unwrap();
    let c4 = sn
        .prepare("c4".into(), "chowned".into(), mapping(100_000))
        .await
        .unwrap();
    {
        let _m = Mounted::new(&c4, &m1);
        assert_eq!(owner(&m1.join("etc/shadow")), (100_000, 100_000));
        assert_eq!(owner(&m1.join("home/user-file")), (101_000, 101_001));
    }
    assert!(
        !c4[0].options.iter().any(|o| o.contains("/mapped/")),
        "{c4:?}"
    );
    sn.shutdown().await.unwrap();
    drop(sn);

    // Off: refused over unmapped layers, served over chowned ones.
    let off = config::StoreConfig {
        idmapped_layers: config::IdmappedLayers::Off,
        ..config::StoreConfig::default()
    };
    let sn = CasSnapshotter::open_with(cas::Layout::ensure(&root).unwrap(), &off).unwrap();
    let e = sn
        .prepare("c5".into(), "l2".into(), mapping(100_000))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("remap-ids"), "{e}");
    assert!(
        sn.stat("c5".into()).await.is_err(),
        "nothing is left of a refused Prepare"
    );
    let c6 = sn
        .prepare("c6".into(), "chowned".into(), mapping(100_000))
        .await
        .unwrap();
    {
        let _m = Mounted::new(&c6, &m1);
        assert_eq!(owner(&m1), (100_000, 100_000));
        assert_eq!(owner(&m1.join("etc/shadow")), (100_000, 100_000));
    }
    let bad = HashMap::from([(
        cas::idmap::UID_MAPPING_LABEL.to_string(),
        "0:1:2".to_string(),
    )]);
    let e = sn.prepare("c7".into(), "l2".into(), bad).await.unwrap_err();
    assert!(e.to_string().contains("gidmapping"), "{e}");
    sn.shutdown().await.unwrap();
}

/// A partial pull that a stop interrupted leaves an active `cas-remote/…` snapshot that
/// containerd never knew: the next start removes it, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: real overlay mounts (make unit runs it)"]
async fn the_next_start_removes_partial_pulls_a_stop_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    {
        let sn = open(&root).await;
        let key = format!(
            "{}1/sha256:{}",
            cas_snapshotter::remote::BUILD_PREFIX,
            "ab".repeat(32)
        );
        sn.prepare(key, String::new(), labels()).await.unwrap();
        sn.prepare("kept".into(), String::new(), labels())
            .await
            .unwrap();
        sn.shutdown().await.unwrap();
    }
    let sn = open(&root).await;
    let left: Vec<String> = walk(&sn).await.into_iter().map(|(k, _, _)| k).collect();
    assert_eq!(left, vec!["kept".to_string()]);
}
