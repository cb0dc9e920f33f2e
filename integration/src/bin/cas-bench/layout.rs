//! The two layouts of a committed layer's metadata, side by side: a stub tree (one
//! sparse file per regular file, with its overlay xattrs, as the store writes today) and
//! one EROFS image per layer ([`cas::erofs`]).
//!
//! For trees of `--files` regular files (in directories of 50, names of 8-24 bytes,
//! like a distribution's `/usr`), on one XFS loop filesystem, median of `--runs`, the
//! runs of both layouts interleaved:
//!
//! * **write**: the layer's metadata made durable: stubs by the store's own
//!   `write_stub` (one thread, as on a 2-core node) then `syncfs`; the image built in
//!   memory, written, `fsync`ed and renamed into place;
//! * **disk**: blocks and inodes the filesystem reports used for it;
//! * **walk**: with caches dropped, the layer mounted as an overlayfs lower over the
//!   data-only object layer (the image through its own EROFS mount) and every file
//!   `lstat`ed through the overlay, then every 10th read: what a container's start
//!   touches (the mounts are made outside the timed part). The image is walked twice:
//!   mounted from its file, and through a loop device (what kernels before 6.12 get).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use cas::erofs::{Attrs, Image, Leaf};
use cas::objects::Redirect;
use cas::stub::{write_stub, FileMeta};
use cas::sys::{Host, ImageMounts};
use cas::Digest;
use cas_integration::harness::{FsKind, LoopFs};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::time::TimeSpec;

use crate::perf::{drop_caches, summary, work_dir};

/// `cas-bench layout` arguments.
#[derive(Debug, clap::Args)]
pub struct LayoutArgs {
    /// Regular files per layer (one measure per value).
    #[arg(long = "files", default_values_t = [5_000, 50_000])]
    pub files: Vec<usize>,
    /// Runs per measure.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the loop file goes (default: a new directory in /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Medians of one layout at one size.
#[derive(Debug, Clone)]
pub struct LayoutRow {
    pub layout: &'static str,
    pub files: usize,
    pub write: f64,
    pub bytes: u64,
    pub inodes: u64,
    pub walk: f64,
}

/// `cas-bench layout`: measures and prints the table.
pub fn run(a: &LayoutArgs) -> Result<()> {
    let (work, _keep) = work_dir(a.workdir.as_deref(), "cas-layout-")?;
    let fs = LoopFs::new(&work, 8 << 10, FsKind::Xfs).context("making the XFS loop filesystem")?;
    let rows = measure(&fs.mnt, &a.files, a.runs)?;
    print!("{}", table(&rows));
    Ok(())
}

/// One file of the synthetic layer.
struct Entry {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

fn entries(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let name = format!("{}{i}", "f".repeat(4 + i % 17));
            let content = format!("content of file {i}\n");
            Entry {
                path: PathBuf::from(format!("usr/d{}/{name}", i / 50)),
                digest: Digest::of(content.as_bytes()),
                size: content.len() as u64,
            }
        })
        .collect()
}

fn meta(size: u64) -> FileMeta {
    FileMeta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        atime: TimeSpec::new(1_700_000_000, 0),
        mtime: TimeSpec::new(1_700_000_000, 0),
    }
}

/// The objects of `files`, for the walk's reads.
fn write_objects(objects: &Path, files: &[Entry]) -> Result<()> {
    for (i, e) in files.iter().enumerate() {
        let at = objects.join(e.digest.object_relpath());
        fs::create_dir_all(at.parent().unwrap())?;
        fs::write(&at, format!("content of file {i}\n"))?;
    }
    Ok(())
}

fn stub_tree(dir: &Path, files: &[Entry]) -> Result<()> {
    let sys = Host;
    for e in files {
        let at = dir.join(&e.path);
        if let Some(p) = at.parent() {
            if !p.exists() {
                fs::create_dir_all(p)?;
            }
        }
        write_stub(&sys, &at, &meta(e.size), &[], &Redirect::Full(e.digest))?;
    }
    nix::unistd::syncfs(File::open(dir)?.as_raw_fd())?;
    Ok(())
}

fn image(at: &Path, files: &[Entry]) -> Result<()> {
    let mut img = Image::new(Attrs::implicit_dir());
    let attrs = Attrs {
        mode: 0o644,
        mtime: 1_700_000_000,
        ..Attrs::default()
    };
    for e in files {
        img.insert(
            &e.path,
            attrs.clone(),
            Leaf::File {
                size: e.size,
                object: Some(e.digest),
            },
        )?;
    }
    let bytes = img.to_bytes()?;
    let tmp = at.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, at)?;
    File::open(at.parent().unwrap())?.sync_all()?;
    Ok(())
}

/// Blocks (bytes) and inodes the filesystem at `mnt` has in use.
fn used(mnt: &Path) -> Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(mnt)?;
    let bytes = (s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64;
    Ok((bytes, s.files() as u64 - s.files_free() as u64))
}

/// Mounts `lower` over `objects` at `merged`, then times the walk.
fn walk(lower: &Path, objects: &Path, merged: &Path, files: &[Entry]) -> Result<f64> {
    fs::create_dir_all(merged)?;
    let options = format!(
        "metacopy=on,lowerdir={}::{}",
        lower.display(),
        objects.display()
    );
    drop_caches()?;
    mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .with_context(|| format!("overlay {options}"))?;
    let t = Instant::now();
    let r = (|| -> Result<()> {
        for e in files {
            fs::symlink_metadata(merged.join(&e.path))?;
        }
        for e in files.iter().step_by(10) {
            let got = fs::read(merged.join(&e.path))?;
            anyhow::ensure!(
                got.len() as u64 == e.size,
                "{:?} read {} bytes",
                e.path,
                got.len()
            );
        }
        Ok(())
    })();
    let secs = t.elapsed().as_secs_f64();
    umount2(merged, MntFlags::MNT_DETACH)?;
    r.map(|()| secs)
}

/// Measures both layouts for each size in `sizes` on the filesystem at `mnt`.
pub fn measure(mnt: &Path, sizes: &[usize], runs: usize) -> Result<Vec<LayoutRow>> {
    let objects = mnt.join("objects");
    let merged = mnt.join("merged");
    let erofs_mnt = mnt.join("erofs-mnt");
    fs::create_dir_all(&erofs_mnt)?;
    let mut rows = Vec::new();
    for &n in sizes {
        let files = entries(n);
        write_objects(&objects, &files)?;
        let (mut stubs, mut imgs) = (Vec::new(), Vec::new());
        let (mut stub_walks, mut img_walks, mut loop_walks) = (Vec::new(), Vec::new(), Vec::new());
        let (mut stub_disk, mut img_disk) = ((0, 0), (0, 0));
        for run in 0..runs {
            // stub tree
            let dir = mnt.join(format!("stubs-{run}"));
            fs::create_dir_all(&dir)?;
            nix::unistd::sync();
            let before = used(mnt)?;
            let t = Instant::now();
            stub_tree(&dir, &files)?;
            stubs.push(t.elapsed().as_secs_f64());
            let after = used(mnt)?;
            stub_disk = (after.0 - before.0, after.1 - before.1);
            stub_walks.push(walk(&dir, &objects, &merged, &files)?);
            cas::layout::remove_tree(&dir)?;

            // image
            let file = mnt.join(format!("layer-{run}.erofs"));
            nix::unistd::sync();
            let before = used(mnt)?;
            let t = Instant::now();
            image(&file, &files)?;
            imgs.push(t.elapsed().as_secs_f64());
            let after = used(mnt)?;
            img_disk = (after.0.saturating_sub(before.0), after.1 - before.1);
            for (how, walks) in [
                (ImageMounts::Auto, &mut img_walks),
                (ImageMounts::Loop, &mut loop_walks),
            ] {
                cas::sys::mount_erofs(&file, &erofs_mnt, how).context("mount -t erofs")?;
                let w = walk(&erofs_mnt, &objects, &merged, &files);
                umount2(&erofs_mnt, MntFlags::MNT_DETACH)?;
                walks.push(w?);
            }
            let size = fs::metadata(&file)?.size();
            img_disk.0 = img_disk.0.max(size);
            fs::remove_file(&file)?;
            eprintln!(
                "layout: {n} files run {run}: stubs {:.3}s walk {:.3}s, image {:.3}s walk {:.3}s (loop device {:.3}s)",
                stubs[run], stub_walks[run], imgs[run], img_walks[run], loop_walks[run]
            );
        }
        rows.push(LayoutRow {
            layout: "stub tree",
            files: n,
            write: summary(stubs).0,
            bytes: stub_disk.0,
            inodes: stub_disk.1,
            walk: summary(stub_walks).0,
        });
        let write = summary(imgs).0;
        rows.push(LayoutRow {
            layout: "EROFS image",
            files: n,
            write,
            bytes: img_disk.0,
            inodes: img_disk.1,
            walk: summary(img_walks).0,
        });
        rows.push(LayoutRow {
            layout: "EROFS image, loop device",
            files: n,
            write,
            bytes: img_disk.0,
            inodes: img_disk.1,
            walk: summary(loop_walks).0,
        });
        cas::layout::remove_tree(&objects)?;
    }
    Ok(rows)
}

/// The Markdown table of `rows`.
pub fn table(rows: &[LayoutRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| layout | files | write + sync | per file | disk | per file | inodes | lstat all + read 1/10, cold |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} s | {:.1} µs | {:.1} MB | {} B | {} | {:.3} s |",
            r.layout,
            r.files,
            r.write,
            r.write / r.files as f64 * 1e6,
            r.bytes as f64 / 1e6,
            r.bytes / r.files as u64,
            r.inodes,
            r.walk
        );
    }
    s
}
