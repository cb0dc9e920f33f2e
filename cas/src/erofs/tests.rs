//! The writer's tree rules (no root needed) and, with root, the kernel as the reader:
//! images mounted as EROFS and as overlayfs lower layers over a data-only object layer.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::*;
use crate::sys::{ImageMounts, ImageSource};

fn attrs(mode: u32, uid: u32, gid: u32, mtime: i64) -> Attrs {
    Attrs {
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    }
}

/// A metadata-only file of `size` bytes whose object is the digest of `seed`.
fn file(size: u64, seed: &str) -> Leaf {
    Leaf::File {
        size,
        object: Some(crate::Digest::of(seed.as_bytes())),
    }
}

#[test]
fn later_entries_replace_earlier_ones_and_directories_keep_their_entries() {
    let mut img = Image::new(Attrs::implicit_dir());
    img.insert(Path::new("a/b/f"), attrs(0o644, 0, 0, 1), file(3, "/x"))
        .unwrap();
    assert_eq!(img.kind(Path::new("a")), Some(true), "parents are made");
    assert_eq!(img.kind(Path::new("a/b/f")), Some(false));
    // a directory named again keeps what it holds and takes the new attributes
    img.dir(Path::new("a/b"), attrs(0o700, 5, 5, 2)).unwrap();
    assert_eq!(img.kind(Path::new("a/b/f")), Some(false));
    assert_eq!(img.attrs_mut(Path::new("a/b")).unwrap().mode, 0o700);
    // a file over a directory drops the directory and all it holds
    img.insert(Path::new("a/b"), attrs(0o644, 0, 0, 3), Leaf::Fifo)
        .unwrap();
    assert_eq!(img.kind(Path::new("a/b/f")), None);
    assert_eq!(img.len(), 3, "root, a, a/b");
    // a directory over a file replaces it
    img.dir(Path::new("a/b"), attrs(0o755, 0, 0, 4)).unwrap();
    assert_eq!(img.kind(Path::new("a/b")), Some(true));
    assert!(img.remove(Path::new("a")).unwrap());
    assert!(!img.remove(Path::new("a")).unwrap());
    assert!(img.is_empty());
}

#[test]
fn hardlinks_share_one_inode_until_the_last_name_goes() {
    let mut img = Image::new(Attrs::implicit_dir());
    img.insert(Path::new("f"), attrs(0o644, 0, 0, 1), file(3, "/x"))
        .unwrap();
    img.link(Path::new("g"), Path::new("f")).unwrap();
    img.link(Path::new("d/h"), Path::new("f")).unwrap();
    assert_eq!(img.len(), 3, "root, d and one file inode");
    img.remove(Path::new("f")).unwrap();
    assert_eq!(img.len(), 3);
    img.remove(Path::new("g")).unwrap();
    img.remove(Path::new("d/h")).unwrap();
    assert_eq!(img.len(), 2);
    img.dir(Path::new("d"), Attrs::implicit_dir()).unwrap();
    assert_eq!(
        img.link(Path::new("x"), Path::new("d")),
        Err(ImageError::LinkToDirectory("d".into()))
    );
    assert_eq!(
        img.link(Path::new("x"), Path::new("nope")),
        Err(ImageError::NotFound("nope".into()))
    );
}

#[test]
fn paths_outside_the_layer_and_unstorable_xattrs_are_refused() {
    let mut img = Image::new(Attrs::implicit_dir());
    for bad in ["", "a/../b", "..", "/"] {
        assert_eq!(
            img.insert(Path::new(bad), Attrs::implicit_dir(), Leaf::Fifo),
            Err(ImageError::BadPath(bad.into())),
            "{bad:?}"
        );
    }
    img.insert(Path::new("f"), attrs(0o644, 0, 0, 1), Leaf::Fifo)
        .unwrap();
    assert_eq!(
        img.insert(Path::new("f/g"), Attrs::implicit_dir(), Leaf::Fifo),
        Err(ImageError::NotADirectory("f/g".into()))
    );
    let long = "n".repeat(256);
    assert_eq!(
        img.insert(Path::new(&long), Attrs::implicit_dir(), Leaf::Fifo),
        Err(ImageError::NameTooLong(long.clone().into()))
    );
    let mut a = attrs(0o644, 0, 0, 1);
    a.xattrs.push((b"weird.name".to_vec(), b"v".to_vec()));
    img.insert(Path::new("x"), a, Leaf::Fifo).unwrap();
    assert!(matches!(
        img.to_bytes(),
        Err(ImageError::XattrNamespace { .. })
    ));
}

#[test]
fn images_are_block_aligned_deterministic_and_share_the_metacopy_xattr() {
    let mut img = Image::new(Attrs::implicit_dir());
    for i in 0..100 {
        img.insert(
            Path::new(&format!("d/f{i}")),
            attrs(0o644, 0, 0, 1),
            file(10, &format!("/ab/{i:062}")),
        )
        .unwrap();
    }
    let bytes = img.to_bytes().unwrap();
    assert_eq!(bytes.len() % BLOCK_SIZE, 0);
    assert_eq!(&bytes[1024..1028], &format::MAGIC.to_le_bytes());
    assert_eq!(bytes, img.to_bytes().unwrap(), "same tree, same bytes");
    // per file: inode, ibody header, one shared id, the redirect entry and the block map
    let per_file = INODE_SIZE + 12 + 4 + format::round_up(4 + 16 + 66, 4) + 4;
    assert!(
        bytes.len() < 100 * (per_file + 32) + 4 * BLOCK_SIZE,
        "{} bytes",
        bytes.len()
    );
}

// --- with root: the kernel reads the images ---

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Mounts are undone when the test ends, however it ends.
struct Mounted(Vec<std::path::PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

fn mount_image(image: &Path, at: &Path, how: ImageMounts) {
    fs::create_dir_all(at).unwrap();
    let source = crate::sys::mount_erofs(image, at, how)
        .unwrap_or_else(|e| panic!("mount -t erofs {image:?} ({how:?}): {e}"));
    let device = mount_source(at).unwrap();
    match source {
        ImageSource::File => assert_eq!(Path::new(&device), image),
        ImageSource::Loop { .. } => {
            assert!(device.starts_with("/dev/loop"), "{device}");
            assert_eq!(
                ringio::loopdev::backing_file(Path::new(&device)).as_deref(),
                Some(image)
            );
        }
    }
    if how == ImageMounts::Loop {
        assert!(matches!(source, ImageSource::Loop { .. }), "{source:?}");
    }
}

/// The source of the mount at `at`, as `/proc/self/mountinfo` shows it.
fn mount_source(at: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (Path::new(point) == at).then(|| right.split(' ').nth(1).map(str::to_string))?
    })
}

#[test]
#[ignore = "needs root (mounts EROFS and overlayfs)"]
fn the_kernel_reads_every_kind_of_entry() {
    the_kernel_reads_every_kind_of_entry_in(ImageMounts::Auto);
}

#[test]
#[ignore = "needs root and a loop device (mounts EROFS and overlayfs)"]
fn the_kernel_reads_every_kind_of_entry_through_a_loop_device() {
    the_kernel_reads_every_kind_of_entry_in(ImageMounts::Loop);
}

fn the_kernel_reads_every_kind_of_entry_in(how: ImageMounts) {
    assert!(is_root());
    let dir = tempfile::tempdir().unwrap();
    let mut img = Image::new(attrs(0o755, 0, 0, 1_600_000_000));
    let mut f = attrs(0o4755, 1000, 1001, 1_700_000_000);
    f.mtime_nsec = 123_456_789;
    f.xattrs.push((b"user.note".to_vec(), b"hello".to_vec()));
    f.xattrs.push((
        b"security.capability".to_vec(),
        vec![1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ));
    img.insert(Path::new("bin/tool"), f, file(12_345, "/ab/cd"))
        .unwrap();
    img.link(Path::new("bin/tool2"), Path::new("bin/tool"))
        .unwrap();
    img.insert(
        Path::new("empty"),
        attrs(0o600, 0, 0, 5),
        Leaf::File {
            size: 0,
            object: None,
        },
    )
    .unwrap();
    img.insert(
        Path::new("link"),
        attrs(0o777, 0, 0, 6),
        Leaf::Symlink(b"bin/tool".to_vec()),
    )
    .unwrap();
    let long_target = "t".repeat(3000);
    img.insert(
        Path::new("longlink"),
        attrs(0o777, 0, 0, 6),
        Leaf::Symlink(long_target.clone().into_bytes()),
    )
    .unwrap();
    img.insert(
        Path::new("dev/null"),
        attrs(0o666, 0, 0, 7),
        Leaf::CharDevice { major: 1, minor: 3 },
    )
    .unwrap();
    img.insert(
        Path::new("dev/big"),
        attrs(0o660, 0, 6, 7),
        Leaf::BlockDevice {
            major: 259,
            minor: 300_000,
        },
    )
    .unwrap();
    img.insert(Path::new("fifo"), attrs(0o644, 0, 0, 8), Leaf::Fifo)
        .unwrap();
    img.insert(Path::new("sock"), attrs(0o755, 0, 0, 8), Leaf::Socket)
        .unwrap();
    // a directory over several blocks, with names of every length
    for i in 0..3000 {
        let name = format!("many/{}{i}", "x".repeat(i % 200));
        img.insert(Path::new(&name), attrs(0o644, 0, 0, 9), file(1, "/ab/ef"))
            .unwrap();
    }
    let path = dir.path().join("layer.erofs");
    fs::write(&path, img.to_bytes().unwrap()).unwrap();
    let mnt = dir.path().join("mnt");
    mount_image(&path, &mnt, how);
    let _m = Mounted(vec![mnt.clone()]);

    let md = fs::symlink_metadata(mnt.join("bin/tool")).unwrap();
    assert!(md.file_type().is_file());
    assert_eq!(md.mode() & 0o7777, 0o4755);
    assert_eq!((md.uid(), md.gid(), md.size()), (1000, 1001, 12_345));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 123_456_789));
    assert_eq!(md.nlink(), 2);
    assert_eq!(
        md.ino(),
        fs::symlink_metadata(mnt.join("bin/tool2")).unwrap().ino()
    );
    assert_eq!(
        xattr::get(mnt.join("bin/tool"), "user.note")
            .unwrap()
            .unwrap(),
        b"hello"
    );
    assert!(xattr::get(mnt.join("bin/tool"), "security.capability")
        .unwrap()
        .is_some());
    assert_eq!(
        xattr::get(mnt.join("bin/tool"), "trusted.overlay.redirect")
            .unwrap()
            .unwrap(),
        crate::Digest::of(b"/ab/cd").redirect().into_bytes()
    );
    assert_eq!(
        xattr::get(mnt.join("bin/tool"), "trusted.overlay.metacopy")
            .unwrap()
            .unwrap(),
        b""
    );
    assert_eq!(fs::metadata(mnt.join("empty")).unwrap().len(), 0);
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("bin/tool")
    );
    assert_eq!(
        fs::read_link(mnt.join("longlink")).unwrap(),
        Path::new(&long_target)
    );
    let null = fs::symlink_metadata(mnt.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let big = fs::symlink_metadata(mnt.join("dev/big")).unwrap();
    assert!(big.file_type().is_block_device());
    assert_eq!(big.rdev(), nix::sys::stat::makedev(259, 300_000));
    assert_eq!(big.gid(), 6);
    assert!(fs::symlink_metadata(mnt.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(mnt.join("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    let root = fs::metadata(&mnt).unwrap();
    assert_eq!(root.mtime(), 1_600_000_000);
    assert_eq!(root.nlink(), 5, "root: ., .., bin, dev, many");
    let mut names: Vec<String> = fs::read_dir(mnt.join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..3000)
        .map(|i| format!("{}{i}", "x".repeat(i % 200)))
        .collect();
    want.sort();
    assert_eq!(names, want);
    for i in [0, 199, 1234, 2999] {
        let name = format!("many/{}{i}", "x".repeat(i % 200));
        assert_eq!(fs::metadata(mnt.join(&name)).unwrap().len(), 1, "{name}");
    }
}

#[test]
#[ignore = "needs root (mounts EROFS and overlayfs)"]
fn images_are_overlay_layers_with_data_from_the_objects() {
    images_are_overlay_layers_with_data_from_the_objects_in(ImageMounts::Auto);
}

/// Also: a loop device goes once its image's mount and the overlay over it are gone.
#[test]
#[ignore = "needs root and a loop device (mounts EROFS and overlayfs)"]
fn images_through_loop_devices_are_overlay_layers_and_release_them() {
    images_are_overlay_layers_with_data_from_the_objects_in(ImageMounts::Loop);
}

fn images_are_overlay_layers_with_data_from_the_objects_in(how: ImageMounts) {
    assert!(is_root());
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let data = b"bytes of the object\n";
    let digest = crate::Digest::of(data);
    let object = objects.join(digest.object_relpath());
    fs::create_dir_all(object.parent().unwrap()).unwrap();
    fs::write(&object, data).unwrap();
    let size = data.len() as u64;

    // lower layer: etc/{a,b}, keep/c, gone
    let mut lower = Image::new(Attrs::implicit_dir());
    for p in ["etc/a", "etc/b", "keep/c", "gone"] {
        lower
            .insert(
                Path::new(p),
                attrs(0o644, 0, 0, 1),
                Leaf::File {
                    size,
                    object: Some(digest),
                },
            )
            .unwrap();
    }
    // upper layer: etc opaque with only etc/new, gone whited out, keep untouched
    let mut upper = Image::new(Attrs::implicit_dir());
    let mut opaque = attrs(0o755, 0, 0, 2);
    opaque
        .xattrs
        .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    upper.dir(Path::new("etc"), opaque).unwrap();
    upper
        .insert(
            Path::new("etc/new"),
            attrs(0o600, 7, 7, 2),
            Leaf::File {
                size,
                object: Some(digest),
            },
        )
        .unwrap();
    upper
        .insert(Path::new("gone"), attrs(0, 0, 0, 2), Leaf::WHITEOUT)
        .unwrap();

    let mut mounts = Mounted(Vec::new());
    let mut layers = Vec::new();
    for (name, img) in [("lower", &lower), ("upper", &upper)] {
        let file = dir.path().join(format!("{name}.erofs"));
        fs::write(&file, img.to_bytes().unwrap()).unwrap();
        let at = dir.path().join(name);
        mount_image(&file, &at, how);
        mounts.0.push(at.clone());
        layers.push(at);
    }
    let merged = dir.path().join("merged");
    fs::create_dir_all(&merged).unwrap();
    let options = format!(
        "metacopy=on,lowerdir={}:{}::{}",
        layers[1].display(),
        layers[0].display(),
        objects.display()
    );
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .unwrap_or_else(|e| panic!("overlay {options}: {e}"));
    mounts.0.push(merged.clone());

    let mut etc: Vec<_> = fs::read_dir(merged.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    etc.sort();
    assert_eq!(
        etc,
        ["new"],
        "the opaque directory hides the lower layer's entries"
    );
    assert!(
        !merged.join("gone").exists(),
        "the whiteout hides the lower file"
    );
    assert_eq!(fs::read(merged.join("keep/c")).unwrap(), data);
    assert_eq!(
        fs::read(merged.join("etc/new")).unwrap(),
        data,
        "data from the object"
    );
    let md = fs::metadata(merged.join("etc/new")).unwrap();
    assert_eq!(
        (md.uid(), md.mode() & 0o7777, md.len()),
        (7, 0o600, size),
        "metadata from the image"
    );
    assert!(
        xattr::get(merged.join("etc/new"), "trusted.overlay.redirect")
            .unwrap()
            .is_none(),
        "overlayfs keeps its own xattrs to itself"
    );
    let devices: Vec<String> = layers.iter().filter_map(|l| mount_source(l)).collect();
    assert_eq!(devices.len(), 2);
    // the layers' mounts detached first: the overlay still holds both images
    for l in &layers {
        umount2(l, MntFlags::MNT_DETACH).unwrap();
    }
    assert_eq!(fs::read(merged.join("keep/c")).unwrap(), data);
    drop(mounts);
    if how == ImageMounts::Loop {
        for d in &devices {
            let gone = (0..200).any(|_| {
                let attached = ringio::loopdev::backing_file(Path::new(d))
                    .is_some_and(|b| b.starts_with(dir.path()));
                if attached {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                !attached
            });
            assert!(gone, "{d} still holds its image");
        }
    }
}

#[test]
#[ignore = "needs root (mounts EROFS and overlayfs)"]
fn directories_of_every_size_read_back_whatever_their_inode_holds() {
    // directory tails of every length next to inodes with small and large xattrs, so
    // tails land inline, on a fresh block, or in a block of their own
    assert!(is_root());
    let dir = tempfile::tempdir().unwrap();
    let mut img = Image::new(Attrs::implicit_dir());
    let mut want = Vec::new();
    for d in 0..300usize {
        let mut a = attrs(0o755, 0, 0, d as i64);
        a.xattrs
            .push((b"user.pad".to_vec(), vec![b'p'; (d * 37) % 3000]));
        let name = format!("d{d}");
        img.dir(Path::new(&name), a).unwrap();
        let mut names = Vec::new();
        for e in 0..(d * 7) % 450 {
            let n = format!("{}{e}", "e".repeat((d + e) % 60));
            img.insert(
                Path::new(&format!("{name}/{n}")),
                attrs(0o644, 0, 0, 1),
                Leaf::Fifo,
            )
            .unwrap();
            names.push(n);
        }
        names.sort();
        want.push((name, names));
    }
    let path = dir.path().join("layer.erofs");
    fs::write(&path, img.to_bytes().unwrap()).unwrap();
    let mnt = dir.path().join("mnt");
    mount_image(&path, &mnt, ImageMounts::Auto);
    let _m = Mounted(vec![mnt.clone()]);
    for (name, names) in want {
        let mut got: Vec<String> = fs::read_dir(mnt.join(&name))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, names, "{name}");
        let pad = xattr::get(mnt.join(&name), "user.pad")
            .unwrap()
            .unwrap_or_default();
        let d: usize = name[1..].parse().unwrap();
        assert_eq!(pad.len(), (d * 37) % 3000, "{name}");
        if let Some(last) = names.last() {
            assert!(fs::symlink_metadata(mnt.join(&name).join(last))
                .unwrap()
                .file_type()
                .is_fifo());
        }
    }
}
