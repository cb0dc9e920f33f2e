//! Recovery time at start with many committed snapshots (a benchmark, not a timed test:
//! `make bench-recovery` runs it and prints the figures; plain `cargo test` skips it).
//!
//! 1,000 parentless snapshots are prepared and committed through the service, then the
//! store is reopened three ways: right after a crash (the journal's records since the
//! last checkpoint are replayed and the index reconciled), after that, and after a clean
//! shutdown (checkpointed). Each reopen is timed as the daemon does at start (journal
//! replay, index open, reconcile, orphan sweep); medians of several runs.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cas_snapshotter::service::CasSnapshotter;
use config::{JournalKind, MountMode};
use containerd_snapshots::Snapshotter;

const SNAPSHOTS: usize = 1000;

fn open(root: &std::path::Path) -> (CasSnapshotter, Duration) {
    let t = Instant::now();
    let sn = CasSnapshotter::open_with(
        cas::Layout::ensure(root).unwrap(),
        MountMode::Auto,
        JournalKind::Auto,
    )
    .unwrap();
    (sn, t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-recovery"]
async fn recovery_with_a_thousand_committed_snapshots() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: stubs need root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let (sn, _) = open(&root);
    let t = Instant::now();
    for i in 0..SNAPSHOTS {
        let m = sn
            .prepare(format!("a{i}"), String::new(), HashMap::new())
            .await
            .unwrap();
        let up = PathBuf::from(&m[0].source);
        fs::write(up.join("file"), format!("content {i}\n")).unwrap();
        fs::write(up.join("shared"), b"the same in every layer\n").unwrap();
        sn.commit(format!("c{i}"), format!("a{i}"), HashMap::new())
            .await
            .unwrap();
    }
    println!(
        "created {SNAPSHOTS} committed snapshots in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // A crash: no shutdown checkpoint.
    drop(sn);
    let (sn, after_crash) = open(&root);
    drop(sn);
    let mut warm = Vec::new();
    for _ in 0..5 {
        let (sn, d) = open(&root);
        sn.checkpoint().await.unwrap();
        drop(sn);
        warm.push(d);
    }
    let list_len = {
        let (sn, _) = open(&root);
        use futures::StreamExt;
        let n = sn.list(String::new(), vec![]).await.unwrap().count().await;
        n
    };
    assert_eq!(list_len, SNAPSHOTS);
    println!(
        "recovery with {SNAPSHOTS} committed snapshots: after a crash {} ms (journal replay + reconcile); \
         after a clean shutdown, median of 5: {} ms",
        after_crash.as_millis(),
        median(warm).as_millis()
    );
}
