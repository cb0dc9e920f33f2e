//! The lifecycle's contract and the order of its steps, on a materialised store (no
//! mounts, no overlayfs xattrs) with a fake kernel probe.
//!
//! Ordering is checked at the crash points themselves: a `fail` callback at each
//! point records what a crash there would leave (directory, mirror, index record), and
//! a panicking callback stands in for the crash, after which the store is reopened and
//! must show the old state or the new one. The real `kill -9` at each point runs in
//! the integration tests (`faults`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use super::*;
use crate::sys::fake::{Call, Recorder};

/// Crash points are process-wide: the tests of this module run one at a time, and
/// each leaves no point configured.
fn serial() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

fn opts() -> OpenOptions {
    OpenOptions {
        idmapped_layers: Default::default(),
        mode: RequestedMode::Auto,
        layers: Default::default(),
        journal: ringio::journal::JournalMode::ForceRename,
        index_cache_bytes: None,
        image_mounts: Default::default(),
    }
}

fn open(root: &Path) -> Snapshots {
    let sys = Arc::new(Recorder::new(false));
    Snapshots::open(Layout::ensure(root).unwrap(), opts(), sys).unwrap()
}

/// A store of stub trees: the fake kernel serves data-only layers, no images.
fn open_stubs(root: &Path) -> Snapshots {
    let sys = Arc::new(Recorder::new(true));
    Snapshots::open(Layout::ensure(root).unwrap(), opts(), sys).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Prepares `key` over `parent`, writes `files` (path, bytes) into it and commits it as
/// `name`.
fn layer(sn: &Snapshots, name: &str, parent: Option<&str>, files: &[(&str, &[u8])]) -> u64 {
    let key = format!("{name}-active");
    sn.create(Kind::Active, &key, parent, BTreeMap::new())
        .unwrap();
    let id = sn.stat(&key).unwrap().id;
    for (path, bytes) in files {
        let p = sn.layout().fs_dir(id).join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    sn.commit(name, &key, BTreeMap::new()).unwrap();
    id
}

#[test]
fn a_snapshot_lives_from_prepare_to_remove() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    assert_eq!(sn.mode(), StoreMode::Materialised);
    let mounts = sn
        .create(Kind::Active, "a", None, labels(&[("x", "1")]))
        .unwrap();
    let id = sn.stat("a").unwrap().id;
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(
        mounts[0].source,
        sn.layout().fs_dir(id).display().to_string()
    );
    assert!(sn.layout().work_dir(id).is_dir());
    fs::write(sn.layout().fs_dir(id).join("f"), b"hello").unwrap();
    assert!(sn.usage("a").unwrap().inodes >= 2);

    let done = sn.commit("l1", "a", labels(&[("y", "2")])).unwrap();
    assert_eq!((done.id, done.stats.files, done.applied), (id, 1, false));
    let rec = sn.stat("l1").unwrap();
    assert_eq!(rec.kind, Kind::Committed);
    assert_eq!(rec.labels, labels(&[("y", "2")]));
    assert_eq!(rec.logical_bytes, 5);
    assert!(matches!(sn.stat("a"), Err(SnapshotError::NotFound(k)) if k == "a"));
    assert!(
        !sn.layout().work_dir(id).exists(),
        "a committed layer keeps no workdir"
    );
    assert_eq!(sn.usage("l1").unwrap(), rec.usage);

    // a view of one materialised layer is a read-only bind of it
    let v = sn
        .create(Kind::View, "v", Some("l1"), BTreeMap::new())
        .unwrap();
    assert_eq!(v[0].kind, "bind");
    assert_eq!(v[0].options, ["ro", "rbind"]);
    assert_eq!(sn.mounts("v").unwrap(), v);
    let vid = sn.stat("v").unwrap().id;
    assert!(!sn.layout().work_dir(vid).exists(), "views have no workdir");

    assert!(matches!(
        sn.remove("l1"),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    sn.remove("v").unwrap();
    sn.remove("l1").unwrap();
    assert!(sn.list().unwrap().is_empty());
    assert!(!sn.layout().snapshot_dir(id).exists());
    let gc = sn.cleanup().unwrap();
    assert_eq!(gc.removed, 1, "the layer's one object is garbage now");
    assert_eq!(sn.stats().unwrap().objects, 0);
}

#[test]
fn requests_containerd_refuses_are_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    let none = BTreeMap::new;
    assert!(matches!(
        sn.create(Kind::Active, "", None, none()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    sn.create(Kind::Active, "a", None, none()).unwrap();
    assert!(matches!(
        sn.create(Kind::Active, "a", None, none()),
        Err(SnapshotError::AlreadyExists(k)) if k == "a"
    ));
    assert!(matches!(
        sn.create(Kind::View, "v", Some("a"), none()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        sn.create(Kind::View, "v", Some("missing"), none()),
        Err(SnapshotError::NotFound(k)) if k == "missing"
    ));
    assert!(matches!(
        sn.commit("", "a", none()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    layer(&sn, "l1", None, &[]);
    assert!(matches!(
        sn.commit("l1", "a", none()),
        Err(SnapshotError::AlreadyExists(k)) if k == "l1"
    ));
    sn.create(Kind::View, "v", Some("l1"), none()).unwrap();
    assert!(matches!(
        sn.commit("v2", "v", none()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        sn.commit("l2", "l1", none()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        sn.mounts("l1"),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        sn.remove("missing"),
        Err(SnapshotError::NotFound(_))
    ));
    assert!(matches!(
        sn.usage("missing"),
        Err(SnapshotError::NotFound(_))
    ));
    // a refused request leaves nothing behind: the store is as before
    let keys: Vec<_> = sn.list().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a", "l1", "v"]);
    assert_eq!(
        fs::read_dir(sn.layout().snapshots_dir()).unwrap().count(),
        3
    );
}

#[test]
fn labels_change_as_asked_and_survive_a_reopen() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    sn.create(Kind::Active, "a", None, labels(&[("x", "1"), ("y", "2")]))
        .unwrap();
    let created = sn.stat("a").unwrap();
    let rec = sn
        .update_labels(
            "a",
            &[
                LabelChange::Set("x".into(), "9".into()),
                LabelChange::Unset("y".into()),
                LabelChange::Set("z".into(), "3".into()),
            ],
        )
        .unwrap();
    assert_eq!(rec.labels, labels(&[("x", "9"), ("z", "3")]));
    assert!(rec.updated >= created.updated);
    assert_eq!(rec.created, created.created);
    let rec = sn
        .update_labels("a", &[LabelChange::Replace(labels(&[("only", "1")]))])
        .unwrap();
    assert_eq!(rec.labels, labels(&[("only", "1")]));
    drop(sn);
    let sn = open(dir.path());
    assert_eq!(sn.stat("a").unwrap().labels, labels(&[("only", "1")]));
}

#[test]
fn a_record_too_large_for_the_journal_takes_the_durable_path() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    let big = "v".repeat(2 * ringio::journal::MAX_PAYLOAD);
    sn.create(Kind::Active, "a", None, labels(&[("big", &big)]))
        .unwrap();
    let id = sn.stat("a").unwrap().id;
    let info = crate::index::read_info(&sn.layout().snapshot_dir(id)).unwrap();
    assert_eq!(info.record.labels["big"], big);
    sn.commit("l", "a", labels(&[("big", &big)])).unwrap();
    drop(sn);
    let sn = open(dir.path());
    assert_eq!(sn.stat("l").unwrap().labels["big"], big);
}

#[test]
fn the_mode_is_chosen_once_and_kept() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::ensure(dir.path()).unwrap();
    // a new store: auto probes, and takes what the kernel can serve
    let without = Recorder::new(false);
    let mode = recovery::choose_mode(&layout, RequestedMode::Auto, &without).unwrap();
    assert_eq!(mode, StoreMode::Materialised);
    assert_eq!(without.calls(), [Call::Probe(layout.tmp_dir())]);
    // kept: a materialised store needs no probe, and refuses data-only
    let with = Recorder::new(true);
    assert_eq!(
        recovery::choose_mode(&layout, RequestedMode::Auto, &with).unwrap(),
        StoreMode::Materialised
    );
    assert!(matches!(
        recovery::choose_mode(&layout, RequestedMode::DataOnly, &with),
        Err(SnapshotError::ModeMismatch {
            stored: StoreMode::Materialised,
            ..
        })
    ));
    assert!(with.calls().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::ensure(dir.path()).unwrap();
    assert_eq!(
        recovery::choose_mode(&layout, RequestedMode::Auto, &with).unwrap(),
        StoreMode::Stubs
    );
    // a stub store is probed at every start (the kernel may have changed) ...
    assert_eq!(
        recovery::choose_mode(&layout, RequestedMode::Auto, &with).unwrap(),
        StoreMode::Stubs
    );
    assert_eq!(with.calls().len(), 2);
    // ... and refuses to start where the probe fails, or when asked to materialise
    assert!(matches!(
        recovery::choose_mode(&layout, RequestedMode::Auto, &without),
        Err(SnapshotError::Unsupported(_))
    ));
    assert!(matches!(
        recovery::choose_mode(&layout, RequestedMode::Materialised, &with),
        Err(SnapshotError::ModeMismatch {
            stored: StoreMode::Stubs,
            ..
        })
    ));
    // data-only on a new store without kernel support: refused, nothing recorded
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::ensure(dir.path()).unwrap();
    assert!(recovery::choose_mode(&layout, RequestedMode::DataOnly, &without).is_err());
    assert_eq!(layout.mode().unwrap(), None);
}

/// What a crash at a point would leave of snapshot `id`: its directory under
/// `snapshots/`, the key its mirror names, and which keys the index knows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    point: &'static str,
    dir: bool,
    mirror: Option<String>,
    indexed: Vec<String>,
}

/// Records a [`Seen`] at each of `points` while `f` runs on `sn`.
fn observe(
    sn: &Arc<Snapshots>,
    id: u64,
    points: &[&'static str],
    f: impl FnOnce(&Snapshots),
) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store: Arc<OnceLock<Arc<Snapshots>>> = Arc::new(OnceLock::new());
    let _ = store.set(sn.clone());
    for &point in points {
        let (seen, store) = (seen.clone(), store.clone());
        fail::cfg_callback(point, move || {
            let sn = store.get().unwrap();
            let dir = sn.layout().snapshot_dir(id);
            let mirror = crate::index::read_info(&dir).ok().map(|i| i.key);
            let indexed = sn
                .list()
                .unwrap()
                .into_iter()
                .filter(|(_, r)| r.id == id)
                .map(|(k, _)| k)
                .collect();
            seen.lock().unwrap().push(Seen {
                point,
                dir: dir.is_dir(),
                mirror,
                indexed,
            });
        })
        .unwrap();
    }
    f(sn);
    for point in points {
        fail::remove(point);
    }
    let out = seen.lock().unwrap().clone();
    out
}

fn seen(point: &'static str, dir: bool, mirror: Option<&str>, indexed: &[&str]) -> Seen {
    Seen {
        point,
        dir,
        mirror: mirror.map(str::to_string),
        indexed: indexed.iter().map(|k| k.to_string()).collect(),
    }
}

/// Each step makes the next durable thing appear only after the one it depends on:
/// directory before mirror before index on create and commit, and the reverse on remove.
#[test]
fn each_step_lands_after_the_one_it_depends_on() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = Arc::new(open(dir.path()));
    let next = sn.meta.next_id().unwrap() + 1;
    let create = ["create.after-dir", "create.after-info"];
    let got = observe(&sn, next, &create, |sn| {
        sn.create(Kind::Active, "a", None, BTreeMap::new()).unwrap();
    });
    assert_eq!(
        got,
        [
            seen("create.after-dir", true, None, &[]),
            seen("create.after-info", true, Some("a"), &[]),
        ]
    );
    let id = sn.stat("a").unwrap().id;
    assert_eq!(id, next);
    fs::write(sn.layout().fs_dir(id).join("f"), b"x").unwrap();

    let commit = [
        "commit.after-ingest",
        "commit.after-record",
        "commit.after-info",
        "commit.after-index",
    ];
    let got = observe(&sn, id, &commit, |sn| {
        sn.commit("l", "a", BTreeMap::new()).unwrap();
    });
    assert_eq!(
        got,
        [
            seen("commit.after-ingest", true, Some("a"), &["a"]),
            seen("commit.after-record", true, Some("a"), &["a"]),
            seen("commit.after-info", true, Some("l"), &["a"]),
            seen("commit.after-index", true, Some("l"), &["l"]),
        ]
    );
    let digest = Digest::of(b"x");
    assert_eq!(sn.meta.ref_count(&digest).unwrap(), 1);

    let remove = [
        "remove.after-info",
        "remove.after-index",
        "remove.after-rename",
    ];
    let got = observe(&sn, id, &remove, |sn| sn.remove("l").unwrap());
    assert_eq!(
        got,
        [
            seen("remove.after-info", true, None, &["l"]),
            seen("remove.after-index", true, None, &[]),
            seen("remove.after-rename", false, None, &[]),
        ]
    );
    assert_eq!(sn.meta.ref_count(&digest).unwrap(), 0);
}

/// Publishes `content` as an object that nothing references and no candidate names, as
/// an ingest interrupted before its references landed leaves one.
fn publish_orphan(sn: &Snapshots, content: &[u8]) {
    let tmp = sn.layout().tmp_dir().join("orphan");
    fs::write(&tmp, content).unwrap();
    sn.objects
        .publish_written(&tmp, &Digest::of(content))
        .unwrap();
    fs::remove_file(&tmp).unwrap();
}

/// Stands in for a crash at `point` during `f`: the step panics there, the store is
/// dropped and opened again, as after a restart.
fn crash_at(root: &Path, point: &'static str, f: impl FnOnce(&Snapshots)) -> Snapshots {
    let sn = open(root);
    fail::cfg_callback(point, move || panic!("crash at {point}")).unwrap();
    let crashed = catch_unwind(AssertUnwindSafe(|| f(&sn)));
    fail::remove(point);
    assert!(crashed.is_err(), "{point} was not reached");
    drop(sn);
    open(root)
}

/// After a crash at any step, the reopened store shows the state before the call or
/// the state after it, never a mix; and it can go on from there.
#[test]
fn a_crash_at_any_step_leaves_the_old_state_or_the_new() {
    let _serial = serial();
    let digest = Digest::of(b"x");
    // create: not answered, so rolled back
    for point in ["create.after-dir", "create.after-info"] {
        let dir = tempfile::tempdir().unwrap();
        let sn = crash_at(dir.path(), point, |sn| {
            let _ = sn.create(Kind::Active, "a", None, BTreeMap::new());
        });
        assert!(
            matches!(sn.stat("a"), Err(SnapshotError::NotFound(_))),
            "{point}"
        );
        assert_eq!(
            fs::read_dir(sn.layout().snapshots_dir()).unwrap().count(),
            0,
            "{point}: the directory is swept"
        );
        sn.create(Kind::Active, "a", None, BTreeMap::new()).unwrap();
    }
    // commit: before the record, still active (containerd redoes it); after, committed
    for (point, committed) in [
        ("commit.after-ingest", false),
        ("commit.after-record", true),
        ("commit.after-info", true),
        ("commit.after-index", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let sn = open(dir.path());
            sn.create(Kind::Active, "a", None, BTreeMap::new()).unwrap();
            let id = sn.stat("a").unwrap().id;
            fs::write(sn.layout().fs_dir(id).join("f"), b"x").unwrap();
        }
        let sn = crash_at(dir.path(), point, |sn| {
            let _ = sn.commit("l", "a", BTreeMap::new());
        });
        let (present, gone) = if committed { ("l", "a") } else { ("a", "l") };
        assert!(sn.stat(present).is_ok(), "{point}: {present} is there");
        assert!(
            matches!(sn.stat(gone), Err(SnapshotError::NotFound(_))),
            "{point}: {gone} is not"
        );
        assert_eq!(
            sn.meta.ref_count(&digest).unwrap(),
            u64::from(committed),
            "{point}: references follow the record"
        );
        if !committed {
            // what containerd does next: remove the active snapshot and collect
            sn.remove("a").unwrap();
            sn.gc().unwrap();
            assert_eq!(sn.stats().unwrap().objects, 0, "{point}: nothing leaks");
        }
        let report = sn.fsck(true).unwrap();
        assert!(report.problems.is_empty(), "{point}: {:?}", report.problems);
    }
    // remove: journaled first, so once under way it completes
    for point in [
        "remove.after-info",
        "remove.after-index",
        "remove.after-rename",
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let sn = open(dir.path());
            layer(&sn, "l", None, &[("f", b"x")]);
        }
        let sn = crash_at(dir.path(), point, |sn| {
            let _ = sn.remove("l");
        });
        assert!(
            matches!(sn.stat("l"), Err(SnapshotError::NotFound(_))),
            "{point}"
        );
        assert_eq!(sn.meta.ref_count(&digest).unwrap(), 0, "{point}");
        assert_eq!(
            fs::read_dir(sn.layout().snapshots_dir()).unwrap().count(),
            0,
            "{point}"
        );
        assert_eq!(
            sn.gc().unwrap().removed,
            1,
            "{point}: the object is collected"
        );
        let report = sn.fsck(true).unwrap();
        assert!(report.problems.is_empty(), "{point}: {:?}", report.problems);
    }
}

#[test]
fn a_clean_shutdown_is_seen_at_the_next_open() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    {
        let sn = open(dir.path());
        layer(&sn, "base", None, &[("etc/os-release", b"debian")]);
        layer(&sn, "app", Some("base"), &[("app/bin", b"elf")]);
        sn.shutdown().unwrap();
    }
    assert!(dir.path().join("clean-stop").exists());
    let sn = open(dir.path());
    assert!(
        !dir.path().join("clean-stop").exists(),
        "the marker is taken at open"
    );
    let keys: Vec<_> = sn.list().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["app", "base"]);
    assert_eq!(sn.stat("app").unwrap().parent.as_deref(), Some("base"));
    let v = sn
        .create(Kind::View, "v", Some("app"), BTreeMap::new())
        .unwrap();
    assert_eq!(v[0].kind, "overlay");
    let lower = v[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    let ids = [sn.stat("app").unwrap().id, sn.stat("base").unwrap().id];
    assert_eq!(
        lower,
        format!(
            "{}:{}",
            sn.layout().fs_dir(ids[0]).display(),
            sn.layout().fs_dir(ids[1]).display()
        ),
        "immediate parent first"
    );
}

/// Two images on one base and a third on its own: each image's unique bytes are what
/// removing it frees, a base under two images is freed by neither, and content that
/// another image holds in a layer of its own is shared.
#[test]
fn an_images_unique_bytes_are_what_its_removal_frees() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "base", None, &[("a", b"in all"), ("b", b"base only")]);
    layer(
        &sn,
        "app1",
        Some("base"),
        &[("x", b"app1 and app2"), ("y", b"in all")],
    );
    layer(
        &sn,
        "app2",
        Some("base"),
        &[("z", b"app2 alone"), ("w", b"app1 and app2")],
    );
    layer(
        &sn,
        "other",
        None,
        &[("q", b"base only"), ("r", b"other alone!")],
    );
    let by_top =
        |usage: Vec<crate::sharing::ChainUsage>| -> BTreeMap<String, (u64, u64, u64, u64)> {
            usage
                .into_iter()
                .map(|u| {
                    (
                        u.top,
                        (u.layers, u.exclusive_layers, u.unique_bytes, u.shared_bytes),
                    )
                })
                .collect()
        };
    let usage = by_top(sn.chain_usage().unwrap());
    assert_eq!(
        usage,
        BTreeMap::from([
            ("app1".to_string(), (2, 1, 0, 6 + 9 + 13)),
            ("app2".to_string(), (2, 1, 10, 6 + 9 + 13)),
            ("other".to_string(), (1, 1, 12, 9)),
        ]),
        "the base is no image of its own while images stand on it"
    );
    for (image, freed) in [("app2", 10), ("other", 12)] {
        sn.remove(image).unwrap();
        assert_eq!(sn.gc().unwrap().freed_bytes, freed, "removing {image}");
    }
    // app1 alone on the base now: everything it references is its own
    let usage = by_top(sn.chain_usage().unwrap());
    assert_eq!(usage["app1"], (2, 2, 6 + 9 + 13, 0));
}

/// Objects in the store, by walking it.
fn object_count(sn: &Snapshots) -> usize {
    crate::gc::list_objects(sn.layout()).unwrap().len()
}

/// fsck in 256 parts finds what it finds in one: a missing object, a wrong reference
/// count, an object the index references that no manifest names, unreferenced objects
/// (one a candidate, one nobody's), and the counters.
#[test]
fn fsck_in_parts_finds_what_one_part_finds() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // stub trees: aliases where the filesystem's inodes cannot hold the long redirect
    let sn = open_stubs(dir.path());
    let files: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("f{i}"), format!("object {i}").into_bytes()))
        .collect();
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    layer(&sn, "a", None, &files[..200]);
    layer(&sn, "b", Some("a"), &files[100..]);
    layer(&sn, "gone", None, &[("g", b"a candidate")]);
    sn.gc().unwrap();
    sn.remove("gone").unwrap();
    let clean =
        crate::fsck::check(sn.layout(), &sn.objects, &sn.meta, true, &mut |_| {}, None).unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!((clean.objects, clean.unreferenced_objects), (301, 1));
    // every object has its alias in its fan-out directory where stubs redirect by alias
    assert_eq!((sn.mode, sn.images), (StoreMode::Stubs, false));
    let aliases = if sn.objects.aliases() { 301 } else { 0 };
    assert_eq!(clean.aliases, aliases);
    assert_eq!(
        crate::gc::list_aliases(sn.layout()).unwrap().len() as u64,
        aliases
    );
    // an alias as an earlier version made it (owned), and one nobody owns
    let old = Digest::of(b"object 3");
    let legacy = sn.objects.alias_path(&old.legacy_alias());
    fs::hard_link(sn.objects.path(&old), &legacy).unwrap();
    let nobody = Digest::of(b"nobody's alias");
    let stray_alias = sn.objects.alias_path(&nobody.alias());
    fs::create_dir_all(stray_alias.parent().unwrap()).unwrap();
    fs::write(&stray_alias, b"nobody's alias").unwrap();

    let missing = Digest::of(b"object 7");
    fs::remove_file(sn.objects.path(&missing)).unwrap();
    let stray = Digest::of(b"nobody's");
    let path = sn.objects.path(&stray);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"nobody's").unwrap();
    let mut refs = HashMap::new();
    refs.insert(Digest::of(b"object 150"), 5);
    refs.insert(Digest::of(b"not named"), 1);
    sn.meta.set_refs(&refs).unwrap();
    let one = crate::fsck::check(
        sn.layout(),
        &sn.objects,
        &sn.meta,
        true,
        &mut |_| {},
        Some(crate::parts::Parts::with_bits(0)),
    )
    .unwrap();
    let mut seen = Vec::new();
    let many = crate::fsck::check(
        sn.layout(),
        &sn.objects,
        &sn.meta,
        true,
        &mut |p| seen.push(p.clone()),
        Some(crate::parts::Parts::with_bits(8)),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&one).unwrap(),
        serde_json::to_value(&many).unwrap()
    );
    let kinds: Vec<String> = many
        .problems
        .iter()
        .map(|p| {
            serde_json::to_value(p).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // where stubs redirect by alias, the missing object's alias is left, one link, and
    // its stub's redirect names nothing
    let expected: &[&str] = if aliases > 0 {
        &[
            "object_missing",
            "stub_mismatch",
            "stray_alias",
            "stray_alias",
            "counter_mismatch",
            "refcount_mismatch",
            "refcount_mismatch",
        ]
    } else {
        &[
            "object_missing",
            "stray_alias",
            "counter_mismatch",
            "refcount_mismatch",
            "refcount_mismatch",
        ]
    };
    assert_eq!(kinds, expected, "{:?}", many.problems);
    assert_eq!((many.unreferenced_objects, many.untracked_garbage), (2, 1));
    assert_eq!(many.aliases, aliases + 2);
    let refs = seen.iter().rev().find(|p| p.phase == "references").unwrap();
    assert_eq!((refs.done, refs.total), (256, Some(256)));
    // and no spill is left in cas/tmp
    assert_eq!(fs::read_dir(sn.layout().tmp_dir()).unwrap().count(), 0);

    // a full collection (`casctl gc` on the stopped store) takes the alias nobody owns
    // and keeps the legacy one
    crate::gc::collect(sn.layout(), &sn.meta).unwrap();
    assert!(!stray_alias.exists());
    assert!(legacy.exists());
    let after = sn.fsck(false).unwrap();
    assert!(
        after
            .problems
            .iter()
            .all(|p| !matches!(p, crate::fsck::Problem::StrayAlias { .. })),
        "{:?}",
        after.problems
    );
}

/// A batch whose time is up stops after one candidate and leaves the rest candidates:
/// the next batch takes them, and nothing is lost or leaked.
#[test]
fn a_gc_batch_out_of_time_leaves_the_rest_to_the_next() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(
        &sn,
        "a",
        None,
        &[("f", b"one"), ("g", b"two"), ("h", b"three")],
    );
    sn.gc().unwrap();
    sn.remove("a").unwrap();
    let batch = sn.meta.candidates(10).unwrap();
    assert_eq!(batch.len(), 3);
    let past = std::time::Instant::now();
    let s = crate::gc::collect_batch(sn.layout(), &sn.meta, &batch, &|_| false, past).unwrap();
    assert_eq!((s.scanned, s.removed), (1, 1), "{s:?}");
    assert_eq!(sn.meta.candidates(10).unwrap(), batch[1..].to_vec());
    assert_eq!(object_count(&sn), 2);
    let g = sn.gc().unwrap();
    assert_eq!((g.scanned, g.removed), (2, 2), "{g:?}");
    assert_eq!(object_count(&sn), 0);
    let report = sn.fsck(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A GC's sweep of `cas/tmp` removes leftover files and trees, and leaves a tree whose
/// deletion is under way to its deleter.
#[test]
fn gc_sweeps_leftovers_and_leaves_trees_being_deleted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    sn.gc().unwrap();
    let tmp = sn.layout().tmp_dir();
    let (busy, left) = (tmp.join("removed-7"), tmp.join("ingested-8"));
    for tree in [&busy, &left] {
        fs::create_dir_all(tree.join("d")).unwrap();
        fs::write(tree.join("d/f"), b"x").unwrap();
    }
    fs::write(tmp.join("apply.1.2"), b"an interrupted write").unwrap();
    let guard = sn.deleting.track(&busy);
    let g = sn.gc().unwrap();
    assert_eq!(g.tmp_removed, 2, "{g:?}");
    assert!(busy.join("d/f").exists(), "its deleter is at work");
    assert!(!left.exists() && !tmp.join("apply.1.2").exists());
    drop(guard);
    assert_eq!(sn.gc().unwrap().tmp_removed, 1);
    assert!(!busy.exists());
}

/// GC takes the candidates only (the objects whose last reference went), never one a
/// Commit referenced again before it ran, and the first GC after an unclean stop scans
/// every object; a crash between deleting a batch's objects and forgetting them as
/// candidates loses nothing and leaks nothing.
#[test]
fn gc_takes_the_candidates_and_never_an_object_referenced_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(
        &sn,
        "a",
        None,
        &[("f", b"kept by b"), ("g", b"reused by c")],
    );
    layer(&sn, "b", None, &[("f", b"kept by b")]);
    // a new store: the first GC scans everything once
    assert_eq!(sn.gc().unwrap().scanned, 2);
    sn.remove("a").unwrap();
    layer(&sn, "c", None, &[("h", b"reused by c")]);
    let g = sn.gc().unwrap();
    assert_eq!(
        (g.scanned, g.removed),
        (0, 0),
        "both referenced again: no candidate"
    );
    layer(&sn, "d", None, &[("i", b"d's own"), ("j", b"more of d")]);
    sn.remove("d").unwrap();
    sn.remove("c").unwrap();
    let g = sn.gc().unwrap();
    assert_eq!(
        (g.scanned, g.removed),
        (3, 3),
        "d's two objects and c's one: {g:?}"
    );
    assert_eq!(object_count(&sn), 1, "b's object stays");
    sn.shutdown().unwrap();
    drop(sn);

    // after a clean stop the candidates are trusted; after a crash, one full scan
    let sn = open(dir.path());
    layer(&sn, "e", None, &[("k", b"e's own")]);
    sn.remove("e").unwrap();
    let g = sn.gc().unwrap();
    assert_eq!((g.scanned, g.removed), (1, 1));
    drop(sn);
    let sn = open(dir.path());
    assert_eq!(sn.gc().unwrap().scanned, 1, "every object, once");
    assert_eq!(sn.gc().unwrap().scanned, 0);

    // a crash before a batch's candidates are forgotten
    layer(&sn, "f", None, &[("l", b"f's own")]);
    sn.remove("f").unwrap();
    sn.shutdown().unwrap();
    drop(sn);
    let sn = crash_at(dir.path(), "gc.before-forget", |sn| {
        sn.gc().unwrap();
    });
    assert_eq!(object_count(&sn), 1, "f's object went before the crash");
    let g = sn.gc().unwrap();
    assert_eq!(g.removed, 0, "{g:?}");
    assert_eq!(object_count(&sn), 1);
    let report = sn.fsck(true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.untracked_garbage, 0);

    // an object nothing references and no candidate names (as a crash mid-ingest leaves
    // one): fsck counts it, the full scan after an unclean stop collects it
    publish_orphan(&sn, b"published, never referenced");
    assert_eq!(sn.fsck(false).unwrap().untracked_garbage, 1);
    assert_eq!(sn.gc().unwrap().removed, 0, "the candidates do not name it");
    drop(sn);
    let sn = open(dir.path());
    assert_eq!(
        sn.fsck(false).unwrap().untracked_garbage,
        0,
        "not complete after a crash"
    );
    assert_eq!(sn.gc().unwrap().removed, 1);
}

/// After an unclean stop, the objects nobody references and no candidate names (an
/// ingest's, published before its references landed) become candidates a chunk at a
/// time, without a collection under one hold: the referenced ones and the candidates
/// stay as they are, the counters count the new candidates, and the next batches
/// collect them. A scan during which the candidates were marked incomplete again does
/// not mark them complete.
#[test]
fn after_an_unclean_stop_unreferenced_objects_become_candidates_in_chunks() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "kept", None, &[("a", b"referenced"), ("b", b"also")]);
    layer(&sn, "gone", None, &[("c", b"a candidate")]);
    sn.remove("gone").unwrap();
    // more orphans than one chunk holds, over many fan-out directories
    let orphans: Vec<Vec<u8>> = (0..GC_BATCH + 44)
        .map(|i| format!("published, never referenced {i}").into_bytes())
        .collect();
    for content in &orphans {
        publish_orphan(&sn, content);
    }
    let before = sn.meta.counters().unwrap().unwrap();
    assert_eq!(before.candidate_objects, 1);
    drop(sn);

    let sn = open(dir.path());
    assert!(!sn.meta.candidates_complete().unwrap(), "after a crash");
    let orphan_bytes: u64 = orphans.iter().map(|o| o.len() as u64).sum();
    let scanned = sn.adopt_unreferenced().unwrap();
    assert_eq!(scanned, 3 + orphans.len() as u64, "every object, once");
    assert!(sn.meta.candidates_complete().unwrap());
    let c = sn.meta.counters().unwrap().unwrap();
    assert_eq!(
        (c.candidate_objects, c.candidate_bytes),
        (
            1 + orphans.len() as u64,
            before.candidate_bytes + orphan_bytes
        )
    );
    assert_eq!(c.referenced_objects, before.referenced_objects);
    assert!(sn.fsck(false).unwrap().problems.is_empty());
    // adopting again adds nothing
    assert_eq!(
        sn.meta
            .adopt_unreferenced(&[(Digest::of(b"referenced"), 10)])
            .unwrap(),
        0
    );
    let g = sn.gc().unwrap();
    assert_eq!(g.removed, 1 + orphans.len() as u64, "{g:?}");
    assert_eq!(object_count(&sn), 2, "the referenced ones stay");
    let r = sn.fsck(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.untracked_garbage, 0);

    // marked incomplete while a scan ran: the scan leaves them incomplete
    let marks = sn.meta.incomplete_marks();
    sn.meta.set_candidates_complete(false).unwrap();
    assert!(!sn.meta.complete_candidates_since(marks).unwrap());
    assert!(!sn.meta.candidates_complete().unwrap());
    assert!(sn
        .meta
        .complete_candidates_since(sn.meta.incomplete_marks())
        .unwrap());
}

/// A crash while unreferenced objects are being made candidates, after some chunks:
/// the candidates stay incomplete, the next GC makes the rest candidates and collects
/// them all, and nothing referenced goes.
#[test]
fn a_crash_between_adopted_chunks_loses_nothing_and_leaks_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "kept", None, &[("a", b"referenced")]);
    // orphans over most fan-out directories, so the scan adopts chunk after chunk
    let orphans = 2 * GC_BATCH + 10;
    for i in 0..orphans {
        publish_orphan(&sn, format!("published, never referenced {i}").as_bytes());
    }
    drop(sn);
    let sn = crash_at(dir.path(), "gc.after-adopting-a-chunk", |sn| {
        sn.gc().unwrap();
    });
    assert!(!sn.meta.candidates_complete().unwrap());
    let adopted = sn.meta.counters().unwrap().unwrap().candidate_objects;
    assert!(adopted > 0 && adopted < orphans as u64, "{adopted}");
    let g = sn.gc().unwrap();
    assert_eq!(g.removed, orphans as u64, "{g:?}");
    assert_eq!(object_count(&sn), 1, "the referenced one stays");
    let r = sn.fsck(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.untracked_garbage, 0);
}

/// Stats come from the index's counters. A store whose index predates them counts them
/// once when it opens. fsck finds counters that disagree with the scan, and a full
/// collection recounts them.
#[test]
fn object_counters_are_counted_once_checked_by_fsck_and_recounted_by_a_full_gc() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let figures = |s: &Stats| {
        (
            s.objects,
            s.physical_bytes,
            s.unreferenced_objects,
            s.unreferenced_bytes,
        )
    };
    let want = {
        let sn = open(dir.path());
        layer(&sn, "l1", None, &[("a", b"hello"), ("b", b"world!")]);
        layer(
            &sn,
            "l2",
            Some("l1"),
            &[("c", b"hello"), ("d", b"only here")],
        );
        layer(&sn, "l3", Some("l2"), &[("e", b"goes")]);
        sn.remove("l3").unwrap();
        let s = sn.stats().unwrap();
        assert!(s.counted, "{s:?}");
        // hello, world!, only here referenced; goes a candidate
        assert_eq!(figures(&s), (4, 5 + 6 + 9 + 4, 1, 4), "{s:?}");
        assert!(sn.fsck(false).unwrap().problems.is_empty());
        sn.meta.forget_counters().unwrap();
        sn.meta.flush_blocking().unwrap();
        s
    };
    let sn = open(dir.path());
    let s = sn.stats().unwrap();
    assert_eq!(figures(&s), figures(&want), "counted at open: {s:?}");

    // counters that disagree with the scan: fsck says which
    let wrong = crate::index::Counters {
        referenced_objects: 7,
        ..sn.meta.counters().unwrap().unwrap()
    };
    sn.meta.set_counters(&wrong, &[]).unwrap();
    let problems = sn.fsck(false).unwrap().problems;
    assert_eq!(
        problems,
        [crate::fsck::Problem::CounterMismatch {
            counter: "referenced_objects".into(),
            index: 7,
            scan: 3,
        }]
    );
    // a full collection (`casctl gc` on the stopped store) recounts
    crate::gc::collect(sn.layout(), &sn.meta).unwrap();
    let s = sn.stats().unwrap();
    assert_eq!(figures(&s), (3, 5 + 6 + 9, 0, 0), "{s:?}");
    // fsck says how far it has come, each phase ending at its total
    let mut seen = Vec::new();
    let r = sn
        .fsck_with_progress(false, &mut |p| seen.push(p.clone()))
        .unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
    let last = |phase: &str| seen.iter().rev().find(|p| p.phase == phase).cloned();
    let objects = last("objects").expect("objects phase");
    assert_eq!((objects.done, objects.total), (3, Some(3)));
    let snapshots = last("snapshots").expect("snapshots phase");
    assert_eq!((snapshots.done, snapshots.total), (2, Some(2)));
}

/// A plain tar of regular files (root's, mode 0644).
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer applied and not committed yet keeps its objects: a GC batch leaves a
/// candidate the apply reused, in the process that applied it and after a restart (the
/// applied layers are read again at open). Its Commit makes them references; an
/// uncommitted one removed takes its new objects with it.
#[test]
fn an_applied_layers_objects_are_kept_until_its_commit() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pool = ringio::Pool::start(&ringio::PoolConfig {
        backend: ringio::BackendChoice::Threads,
        ..ringio::PoolConfig::default()
    })
    .unwrap();
    let apply = |sn: &Snapshots, key: &str, files: &[(&str, &[u8])]| {
        sn.create(Kind::Active, key, None, BTreeMap::new()).unwrap();
        let tar = tar_of(files);
        sn.apply_blob(
            key,
            &tar[..],
            tar.len() as u64,
            None,
            Limits::default(),
            &pool,
        )
        .unwrap();
    };
    let sn = open_stubs(dir.path());
    layer(
        &sn,
        "a",
        None,
        &[("f1", b"reused first"), ("g", b"a's own")],
    );
    layer(&sn, "x", None, &[("f2", b"reused after a restart")]);
    sn.gc().unwrap();
    apply(
        &sn,
        "b-active",
        &[
            ("f1", b"reused first"),
            ("f2", b"reused after a restart"),
            ("n", b"new in b"),
        ],
    );
    assert_eq!(sn.pending.len(), 1);
    sn.remove("a").unwrap();
    let g = sn.gc().unwrap();
    assert_eq!((g.scanned, g.removed), (2, 1), "a's own goes: {g:?}");
    assert!(sn.objects.path(&Digest::of(b"reused first")).exists());
    sn.shutdown().unwrap();
    drop(sn);

    let sn = open_stubs(dir.path());
    assert_eq!(sn.pending.len(), 1, "read again at open");
    sn.remove("x").unwrap();
    let g = sn.gc().unwrap();
    assert_eq!((g.scanned, g.removed), (1, 0), "{g:?}");
    sn.commit("b", "b-active", BTreeMap::new()).unwrap();
    assert!(sn.pending.is_empty());
    assert_eq!(object_count(&sn), 3);

    apply(
        &sn,
        "c-active",
        &[("m", b"new in c"), ("f1", b"reused first")],
    );
    assert_eq!(object_count(&sn), 4);
    sn.remove("c-active").unwrap();
    assert!(sn.pending.is_empty());
    assert_eq!(object_count(&sn), 3, "c's new object went with it");
    let report = sn.fsck(true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.untracked_garbage, 0);
}

/// A Commit that fails after its ingest wrote the layer's manifest leaves an applied
/// layer behind (a retried Commit takes it as one): its manifest keeps its objects from
/// a later GC batch as an apply's does, and the retry finds them all.
#[test]
fn a_failed_commits_manifest_keeps_its_objects() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sn = open_stubs(dir.path());
    layer(
        &sn,
        "a",
        None,
        &[("x", b"shared with b"), ("y", b"a's own")],
    );
    sn.gc().unwrap();
    sn.create(Kind::Active, "b-active", None, BTreeMap::new())
        .unwrap();
    let id = sn.stat("b-active").unwrap().id;
    fs::write(sn.layout().fs_dir(id).join("x"), b"shared with b").unwrap();
    fail::cfg_callback("commit.after-ingest", || {
        panic!("a failure after the ingest")
    })
    .unwrap();
    let failed = catch_unwind(AssertUnwindSafe(|| {
        sn.commit("b", "b-active", BTreeMap::new())
    }));
    fail::remove("commit.after-ingest");
    assert!(failed.is_err());
    assert!(sn.layout().manifest(id).exists());
    assert_eq!(sn.pending.len(), 1);
    // the failure asked for one full collection; then a batch over a's objects
    sn.gc().unwrap();
    sn.remove("a").unwrap();
    let g = sn.gc().unwrap();
    assert_eq!((g.scanned, g.removed), (2, 1), "{g:?}");
    sn.commit("b", "b-active", BTreeMap::new()).unwrap();
    assert!(sn.pending.is_empty());
    let report = sn.fsck(true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(object_count(&sn), 1);
}
