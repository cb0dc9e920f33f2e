//! The one-pass fast path (`cas-diff`) under real containerd, beyond the happy gzip pull:
//!
//! * the fixture images as gzip, zstd and plain tar layers, unpacked through `cas-diff`
//!   and compared with containerd's overlayfs, with the I/O workers on io_uring and
//!   forced onto plain threads;
//! * layers that must be refused (a blob damaged in containerd's content store, a gzip
//!   stream that is itself broken, a wrong diffID in the config, a decompression bomb):
//!   the pull fails naming the cause, and nothing of the layer stays behind;
//! * the daemon killed at the fast path's crash points, then restarted.
//!
//! Uses the cached containerd 1.7 / 2.x releases (`scripts/containerd-versions.sh`) and
//! needs root; skips, saying why, otherwise.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use cas_integration::compression::Compression;
use cas_integration::fixture::{APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{require_root, ContainerdOptions, Rig, RigOptions};
use cas_integration::layers::{files_tar, truncated_gzip, unique_bytes, zero_bomb, Image, Layer};
use cas_integration::registry::push_layout;
use serde_json::Value;

/// `[differ] max_layer_bytes` of the failure test: the bomb expands beyond it.
const MAX_LAYER_BYTES: u64 = 64 << 20;
/// The bomb's file of zeros.
const BOMB_BYTES: u64 = 256 << 20;

fn rig_on(containerd: ContainerdOptions, daemon_config: Option<&str>) -> Result<Option<Rig>> {
    if !require_root() || !containerd.bin.available() {
        return Ok(None);
    }
    let started = Instant::now();
    let rig = Rig::start_with(RigOptions {
        containerd,
        daemon_config: daemon_config.map(str::to_string),
        ..RigOptions::default()
    })?;
    ensure!(
        rig.containerd.differ,
        "containerd {} did not get cas-diff",
        rig.containerd.version
    );
    eprintln!(
        "containerd {} with cas-diff, up in {:?}",
        rig.containerd.version,
        started.elapsed()
    );
    Ok(Some(rig))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn fsck(rig: &Rig, verify: bool, when: &str) -> Result<()> {
    let args: &[&str] = if verify {
        &["fsck", "--verify-objects"]
    } else {
        &["fsck"]
    };
    let (code, out) = rig.casctl(args)?;
    ensure!(code == 0, "fsck {when}:\n{out}\n{}", rig.logs());
    Ok(())
}

/// Pushes `img` as `<registry>/fixture/<repo>:1`; returns its reference.
fn push(rig: &Rig, img: &Image, repo: &str) -> Result<String> {
    let dir = rig
        .dir
        .path()
        .join(format!("img-{}", repo.replace('/', "-")));
    let written = img.write(&dir)?;
    push_layout(
        &written.layout_dir,
        &rig.registry.addr,
        &format!("fixture/{repo}"),
        "1",
    )?;
    Ok(format!("{}/fixture/{repo}:1", rig.registry.addr))
}

/// Removes images and collects what they held (containerd's GC removes their content
/// and snapshots, on both snapshotters, before `--sync` returns).
fn remove_images(rig: &Rig, refs: &[&str]) -> Result<()> {
    for r in refs {
        let _ = rig.containerd.ctr(&["images", "rm", "--sync", r]);
    }
    Ok(())
}

/// For each encoding: the fixture images so encoded, pulled with cas (through cas-diff)
/// and overlayfs from an empty store, trees compared, containers run, every layer applied
/// by cas-diff, the store verified. The images are removed again before the next
/// encoding, because layers with the same diffIDs are not unpacked twice.
fn encodings_flow(rig: &Rig, encodings: &[Compression]) -> Result<()> {
    let base = Image::read(&rig.base.layout_dir)?;
    let app = Image::read(&rig.app.layout_dir)?;
    for &enc in encodings {
        let started = Instant::now();
        let (base_ref, app_ref) = match enc {
            Compression::Gzip => (rig.base_ref.clone(), rig.app_ref.clone()),
            _ => (
                push(rig, &base.reencode(enc)?, &format!("base-{}", enc.as_str()))?,
                push(rig, &app.reencode(enc)?, &format!("app-{}", enc.as_str()))?,
            ),
        };
        let before = rig.stats()?;
        ensure!(
            num(&before["committed"]) == 0,
            "the store is not empty before the {} round: {before}",
            enc.as_str()
        );
        for image in [&base_ref, &app_ref] {
            rig.pull("cas", image)
                .with_context(|| format!("{} pull with cas\n{}", enc.as_str(), rig.logs()))?;
            rig.pull("overlayfs", image)?;
        }
        rig.assert_same_tree(&base_ref, &format!("base-{}", enc.as_str()))?;
        rig.assert_same_tree(&app_ref, &format!("app-{}", enc.as_str()))?;
        let out = rig.run(&base_ref, "fp-base", &["cat", "/etc/fixture-release"])?;
        ensure!(out == BASE_RELEASE, "{}: base says {out:?}", enc.as_str());
        let out = rig.run(
            &app_ref,
            "fp-app",
            &["sh", "-c", "cat /etc/fixture-release; /app/run.sh"],
        )?;
        ensure!(
            out == format!("{APP_RELEASE}app\n"),
            "{}: app says {out:?}",
            enc.as_str()
        );
        let after = rig.stats()?;
        let (p0, p1) = (&before["ingest_paths"], &after["ingest_paths"]);
        let fast = num(&p1["fast_path_applies"]) - num(&p0["fast_path_applies"]);
        let committed = num(&after["committed"]);
        ensure!(
            committed > 0
                && fast == committed
                && num(&p1["commit_ingests"]) == num(&p0["commit_ingests"])
                && num(&p1["failed_applies"]) == num(&p0["failed_applies"])
                && num(&p1["fallback_applies"]) == num(&p0["fallback_applies"]),
            "{}: expected each of the {committed} layers applied by cas-diff, got {fast}: {after}\n{}",
            enc.as_str(),
            rig.logs()
        );
        fsck(rig, true, &format!("after the {} round", enc.as_str()))?;
        remove_images(rig, &[&base_ref, &app_ref])?;
        eprintln!(
            "{}: {committed} layers through cas-diff in {:?}",
            enc.as_str(),
            started.elapsed()
        );
    }
    Ok(())
}

/// With `content_dir` pointing where containerd keeps nothing, cas-diff streams every
/// blob through containerd's Content API: the same trees, every layer in one pass, and
/// stats that say which way the blobs came.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn blobs_stream_through_the_content_api_without_the_content_dir() -> Result<()> {
    if !require_root() || !ContainerdOptions::cached("2").bin.available() {
        return Ok(());
    }
    let rig = Rig::start_with(RigOptions {
        containerd: ContainerdOptions::cached("2").differ(true),
        content_dir: Some(PathBuf::from("/nonexistent/containerd-content")),
        ..RigOptions::default()
    })?;
    ensure!(
        rig.containerd.differ,
        "no cas-diff on {}",
        rig.containerd.version
    );
    encodings_flow(&rig, &[Compression::Gzip, Compression::Zstd])?;
    let p = &rig.stats()?["ingest_paths"];
    let fast = num(&p["fast_path_applies"]);
    ensure!(
        fast > 0
            && num(&p["blobs_from_content_api"]) == fast
            && num(&p["blobs_from_content_dir"]) == 0,
        "every blob through the Content API: {p}\n{}",
        rig.logs()
    );
    Ok(())
}

fn io_uring_usable() -> bool {
    match fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) => v.trim() == "0",
        Err(_) => true,
    }
}

/// gzip (the fixtures as built), zstd and plain tar layers through cas-diff on
/// containerd 2.x, with the I/O workers on io_uring where the kernel allows it.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn gzip_zstd_and_plain_layers_match_overlayfs() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("2").differ(true), None)? else {
        return Ok(());
    };
    encodings_flow(
        &rig,
        &[Compression::Gzip, Compression::Zstd, Compression::None],
    )?;
    let s = rig.stats()?;
    let p = &s["ingest_paths"];
    ensure!(
        num(&p["blobs_from_content_dir"]) == num(&p["fast_path_applies"])
            && num(&p["blobs_from_content_api"]) == 0,
        "every blob read from containerd's content directory: {p}"
    );
    let backend = s["ingest_paths"]["io_backend"].as_str().unwrap_or_default();
    if io_uring_usable() {
        ensure!(
            backend == "io_uring",
            "io_uring is enabled here: {s}\n{}",
            rig.logs()
        );
    } else {
        eprintln!("io_uring is disabled on this machine; the workers use {backend}");
    }
    Ok(())
}

/// The same with `[ring] backend = "threads"`: the fallback every machine without io_uring
/// takes.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn the_threads_backend_applies_the_same_layers() -> Result<()> {
    let cfg = "[ring]\nbackend = \"threads\"\n";
    let Some(rig) = rig_on(ContainerdOptions::cached("2").differ(true), Some(cfg))? else {
        return Ok(());
    };
    let s = rig.stats()?;
    ensure!(
        s["ingest_paths"]["io_backend"] == "threads",
        "backend = \"threads\" not in effect: {s}"
    );
    encodings_flow(
        &rig,
        &[Compression::Gzip, Compression::Zstd, Compression::None],
    )
}

/// The store's state a failed pull must leave as it was (after containerd's GC).
#[derive(Debug, PartialEq, Eq)]
struct Before {
    /// Objects in the store.
    objects: u64,
    /// Snapshots in the store, of any kind.
    store_snapshots: u64,
    /// `ctr snapshots --snapshotter cas ls`.
    snapshots: String,
}

/// Runs containerd's garbage collection, which removes from the store the snapshots
/// containerd already dropped (it does that lazily): removing a second tag of `image`
/// (pulled) waits for it.
fn containerd_gc(rig: &Rig, image: &str) -> Result<()> {
    let tag = format!("{image}-gc");
    rig.containerd.ctr(&["images", "tag", image, &tag])?;
    rig.containerd.ctr(&["images", "rm", "--sync", &tag])?;
    Ok(())
}

fn store_state(rig: &Rig) -> Result<Before> {
    containerd_gc(rig, &rig.base_ref)?;
    let s = rig.stats()?;
    Ok(Before {
        objects: num(&s["objects"]),
        store_snapshots: num(&s["snapshots"]),
        snapshots: snapshot_list(rig)?,
    })
}

fn snapshot_list(rig: &Rig) -> Result<String> {
    let out = rig
        .containerd
        .ctr(&["snapshots", "--snapshotter", "cas", "ls"])?;
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    Ok(lines.join("\n"))
}

fn tmp_entries(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(root.join("cas/tmp"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?)
}

/// Who refuses a bad layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefusedBy {
    /// cas-diff's apply fails.
    Apply,
    /// containerd, after cas-diff applied the layer (and published its objects).
    Containerd,
}

/// Pulls `image` with cas, which must fail with an error containing every one of
/// `needles`, and leave the store as it was: no snapshot, no object, no temporary file.
fn pull_must_fail(
    rig: &Rig,
    image: &str,
    what: &str,
    needles: &[&str],
    by: RefusedBy,
) -> Result<()> {
    let before = store_state(rig)?;
    let p0 = rig.stats()?["ingest_paths"].clone();
    let log_path = rig.dir.path().join("cas-snapshotter.log");
    let log_start = fs::metadata(&log_path)?.len() as usize;
    let err = match rig.pull("cas", image) {
        Ok(()) => anyhow::bail!("{what}: the pull succeeded\n{}", rig.logs()),
        Err(e) => e.to_string(),
    };
    for n in needles {
        ensure!(
            err.contains(n),
            "{what}: the error does not say {n:?}:\n{err}\n{}",
            rig.logs()
        );
    }
    eprintln!("{what}: refused: {}", err.trim());
    let after = store_state(rig)?;
    ensure!(
        after.snapshots == before.snapshots,
        "{what}: snapshots changed:\nbefore:\n{}\nafter:\n{}",
        before.snapshots,
        after.snapshots
    );
    ensure!(
        after.store_snapshots == before.store_snapshots,
        "{what}: {} snapshots in the store before, {} after\n{}",
        before.store_snapshots,
        after.store_snapshots,
        rig.logs()
    );
    ensure!(
        after.objects == before.objects,
        "{what}: {} objects before, {} after\n{}",
        before.objects,
        after.objects,
        rig.logs()
    );
    let tmp = tmp_entries(&rig.daemon.root)?;
    ensure!(tmp.is_empty(), "{what}: left in cas/tmp: {tmp:?}");
    fsck(rig, false, &format!("after {what}"))?;
    let s = rig.stats()?;
    let p1 = &s["ingest_paths"];
    let failed = num(&p1["failed_applies"]) - num(&p0["failed_applies"]);
    let applied = num(&p1["fast_path_applies"]) - num(&p0["fast_path_applies"]);
    let expected = match by {
        RefusedBy::Apply => (1, 0),
        RefusedBy::Containerd => (0, 1),
    };
    ensure!(
        (failed, applied) == expected,
        "{what}: expected (failed, applied) applies {expected:?}, got {:?}: {s}",
        (failed, applied)
    );
    // The objects a refused layer published were collected with it (by the failed apply,
    // or by the Remove of its applied snapshot), not left for a GC to find.
    let log = fs::read(&log_path)?;
    let log = String::from_utf8_lossy(&log[log_start.min(log.len())..]);
    if by == RefusedBy::Containerd {
        ensure!(
            log.lines()
                .any(|l| l.contains("layer applied") && !l.contains(" new_objects=0 ")),
            "{what}: the apply published no objects, so none were collected:\n{log}"
        );
    }
    let gcs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("garbage collected"))
        .collect();
    ensure!(
        !gcs.is_empty(),
        "{what}: containerd's GC did not call Cleanup:\n{log}"
    );
    for l in gcs {
        ensure!(
            l.contains(" removed=0 "),
            "{what}: objects were left for GC to collect:\n{l}"
        );
    }
    Ok(())
}

/// A good image with its own new content on the base's first layer, pulled and run.
fn good_pull_runs(rig: &Rig, base: &Image, n: u64) -> Result<()> {
    let msg = format!("good image {n}\n");
    let top = Layer::encode(
        &files_tar(&[
            ("good/msg", msg.clone().into_bytes()),
            ("good/data", unique_bytes(200_000, 1000 + n)),
        ])?,
        Compression::Gzip,
    )?;
    let img = Image {
        layers: vec![base.layers[0].clone(), top],
        config: base.config.clone(),
    };
    let r = push(rig, &img, &format!("good-{n}"))?;
    rig.pull("cas", &r)
        .with_context(|| format!("a good pull after a failure\n{}", rig.logs()))?;
    let out = rig.run(&r, &format!("good-{n}"), &["cat", "/good/msg"])?;
    ensure!(out == msg, "good image {n} says {out:?}");
    Ok(())
}

/// A layer of new content (objects the store does not hold) for the bad images.
fn fresh_tar(seed: u64) -> Result<Vec<u8>> {
    files_tar(&[
        ("fresh/a", unique_bytes(300_000, seed)),
        ("fresh/b", unique_bytes(50_000, seed + 1)),
        ("fresh/c/d", unique_bytes(5_000, seed + 2)),
    ])
}

/// Each layer cas-diff must refuse, on containerd 2.x: the pull fails naming the cause,
/// no snapshot of the layer is committed, the store holds no new object and no temporary
/// file, fsck is clean, and a good image pulls and runs afterwards.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn bad_layers_fail_clearly_and_leave_nothing_behind() -> Result<()> {
    let Some(mut rig) = rig_on(ContainerdOptions::cached("2").differ(true), None)? else {
        return Ok(());
    };
    // A small layer limit, next to the [differ] section the rig wrote.
    let cfg = rig.dir.path().join("config.toml");
    let mut text = fs::read_to_string(&cfg)?;
    ensure!(text.contains("[differ]"), "{text}");
    text += &format!("max_layer_bytes = {MAX_LAYER_BYTES}\n");
    fs::write(&cfg, text)?;
    rig.daemon.restart()?;
    rig.wait_reconnected()?;

    let base = Image::read(&rig.base.layout_dir)?;
    rig.pull_after_restart("cas", &rig.base_ref)?;

    // a. A blob damaged in containerd's content store after the fetch: the digest check.
    rig.containerd
        .ctr(&["content", "fetch", "--plain-http", &rig.app_ref])?;
    let top = rig.app.layer_digests.last().context("app without layers")?;
    ensure!(
        !rig.base.layer_digests.contains(top),
        "the app's top layer must be its own"
    );
    let blob = rig
        .containerd
        .dir
        .join("root/io.containerd.content.v1.content/blobs/sha256")
        .join(top.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&blob).with_context(|| format!("{} not fetched", blob.display()))?;
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    fs::write(&blob, &bytes)?;
    pull_must_fail(
        &rig,
        &rig.app_ref,
        "a blob damaged in the content store",
        &["layer blob is corrupt", &top["sha256:".len()..]],
        RefusedBy::Apply,
    )?;
    // Once containerd fetches it again, the same image pulls and runs. (Without the
    // file, the metadata entry alone would make the fetch say "already exists".)
    fs::remove_file(&blob)?;
    rig.containerd.ctr(&["content", "rm", top])?;
    rig.pull("cas", &rig.app_ref)
        .with_context(|| format!("the app after its blob was fetched again\n{}", rig.logs()))?;
    let out = rig.run(&rig.app_ref, "fp-app", &["/app/run.sh"])?;
    ensure!(out == "app\n", "app says {out:?}");

    // b. A gzip stream that is itself broken (its digest is right).
    let img = Image {
        layers: vec![base.layers[0].clone(), truncated_gzip(&fresh_tar(10)?)?],
        config: base.config.clone(),
    };
    let r = push(&rig, &img, "broken-gzip")?;
    pull_must_fail(
        &rig,
        &r,
        "a truncated gzip stream",
        &["does not decompress (gzip)"],
        RefusedBy::Apply,
    )?;
    good_pull_runs(&rig, &base, 1)?;

    // c. A config whose diffID is not the layer's: containerd refuses what cas-diff
    // returns and removes the snapshot; the objects the apply added go with it.
    let img = Image {
        layers: vec![
            base.layers[0].clone(),
            Layer::encode(&fresh_tar(20)?, Compression::Gzip)?.with_wrong_diff_id(),
        ],
        config: base.config.clone(),
    };
    let r = push(&rig, &img, "wrong-diffid")?;
    pull_must_fail(
        &rig,
        &r,
        "a wrong diffID",
        &["wrong diff id"],
        RefusedBy::Containerd,
    )?;
    good_pull_runs(&rig, &base, 2)?;

    // d. A decompression bomb: a few kilobytes of zstd expanding beyond max_layer_bytes.
    let bomb = zero_bomb("zeros", BOMB_BYTES)?;
    ensure!(bomb.blob.len() < 1 << 20, "{} bytes", bomb.blob.len());
    let img = Image {
        layers: vec![base.layers[0].clone(), bomb],
        config: base.config.clone(),
    };
    let r = push(&rig, &img, "bomb")?;
    pull_must_fail(
        &rig,
        &r,
        "a decompression bomb",
        &["decompression bomb", &MAX_LAYER_BYTES.to_string()],
        RefusedBy::Apply,
    )?;
    good_pull_runs(&rig, &base, 3)?;
    fsck(&rig, true, "at the end")
}

/// The fast path's crash points on containerd 1.7 (its diff service tries cas-diff
/// first), in the order a pull, a removal and a GC reach them.
const POINTS: &[&str] = &[
    "apply.before-syncfs",
    "apply.after-manifest",
    "commit.after-record",
    "gc.before-delete",
];

/// The daemon kills itself at each crash point of a pull through cas-diff (and of the
/// GC after it); after a restart fsck is clean, and the image pulls again, through
/// cas-diff, and runs.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn fast_path_crash_points_recover() -> Result<()> {
    let Some(mut rig) = rig_on(ContainerdOptions::cached("1.7").differ(true), None)? else {
        return Ok(());
    };
    let image = rig.app_ref.clone();
    for point in POINTS {
        let started = Instant::now();
        // From a store without the image, so the pull applies every layer anew.
        rig.crash_at(point, &image)?;
        fsck(&rig, false, &format!("after a crash at {point}"))?;
        rig.pull_after_restart("cas", &image)
            .with_context(|| format!("pull after a crash at {point}\n{}", rig.logs()))?;
        let out = rig.run(&image, "fp-crash", &["cat", "/etc/fixture-release"])?;
        ensure!(out == APP_RELEASE, "after a crash at {point}: {out:?}");
        // containerd's GC, with the image in use, removes what the crashed pull left in
        // the store (an active snapshot, applied or not, or a commit containerd never
        // heard of): objects the image holds too must stay.
        containerd_gc(&rig, &image)?;
        let s = rig.stats()?;
        let snaps = snapshot_list(&rig)?;
        ensure!(
            num(&s["snapshots"]) == num(&s["committed"]) && !snaps.contains("Active"),
            "after a crash at {point}, snapshots survive containerd's GC: {s}\n{snaps}"
        );
        let out = rig.run(&image, "fp-crash", &["cat", "/etc/fixture-release"])?;
        ensure!(
            out == APP_RELEASE,
            "after a crash at {point} and a GC: {out:?}"
        );
        let s = rig.stats()?;
        let p = &s["ingest_paths"];
        ensure!(
            num(&p["fast_path_applies"]) > 0
                && num(&p["commit_ingests"]) == 0
                && num(&p["failed_applies"]) == 0,
            "after a crash at {point}, layers did not come in through cas-diff: {s}"
        );
        fsck(&rig, true, &format!("after a crash at {point} and a pull"))?;
        eprintln!(
            "crash point {point}: recovered, fsck clean, image runs ({:?})",
            started.elapsed()
        );
    }
    // Nothing a crash left behind survives a GC once the image is gone.
    rig.containerd.ctr(&["images", "rm", "--sync", &image])?;
    let (code, out) = rig.casctl(&["gc"])?;
    ensure!(code == 0, "{out}");
    let s = rig.stats()?;
    ensure!(
        num(&s["objects"]) == 0 && num(&s["snapshots"]) == 0,
        "left after the crashes: {s}"
    );
    // the counters say what the index holds; the files say what the disk holds
    let report = rig.fsck_report()?;
    ensure!(
        num(&report["objects"]) == 0,
        "object files left after the crashes: {report}"
    );
    let tmp = tmp_entries(&rig.daemon.root)?;
    ensure!(tmp.is_empty(), "left in cas/tmp: {tmp:?}");
    Ok(())
}
