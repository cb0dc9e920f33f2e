//! `casctl --root DIR stats|fsck|gc|rebuild-index [--json]`: inspect and maintain a store.
//!
//! With a daemon running on the store, requests go to its admin socket
//! (`<root>/admin.sock`) and run under the daemon's locks, so they are safe against
//! concurrent pulls and removes. Without one, `casctl` opens the store itself.
//! `rebuild-index` needs the daemon stopped (the daemon also rebuilds by itself at start
//! when its index is unreadable).
//!
//! `fsck` shows how far it has come on standard error: a progress bar on a terminal,
//! a line every few seconds otherwise.
//!
//! Exit status: 0 on success, 1 when `fsck` found problems, 2 on errors.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use cas::admin::{self, AdminRequest, AdminResponse, Progress, Stats};
use cas::fsck::{self, FsckReport};
use cas::gc::GcStats;
use cas::index::MetaStore;
use cas::Layout;
use clap::{Parser, Subcommand};

/// Inspect and maintain a cas-snapshotter store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Store root.
    #[arg(long, default_value = "/var/lib/cas-snapshotter")]
    root: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Logical vs physical bytes, objects, savings.
    Stats,
    /// Check objects, stubs, manifests and the index against each other.
    Fsck {
        /// Also hash every object and compare with its name.
        #[arg(long)]
        verify_objects: bool,
    },
    /// Delete objects that no committed snapshot references.
    Gc,
    /// Per image (leaf chain of layers): the bytes removing it frees and those it shares.
    Images,
    /// Rebuild the index from the snapshots' info files and manifests (daemon stopped).
    RebuildIndex,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_stats(s: &Stats) {
    println!(
        "snapshots:            {} ({} committed)",
        s.snapshots, s.committed
    );
    println!("objects:              {}", s.objects);
    println!(
        "logical bytes:        {} ({})",
        s.logical_bytes,
        human_bytes(s.logical_bytes)
    );
    println!(
        "physical bytes:       {} ({})",
        s.physical_bytes,
        human_bytes(s.physical_bytes)
    );
    println!(
        "saved:                {} ({:.1}%)",
        human_bytes(s.saved_bytes.max(0) as u64),
        s.savings_percent
    );
    println!(
        "unreferenced objects: {} ({}){}",
        s.unreferenced_objects,
        human_bytes(s.unreferenced_bytes),
        if s.uncounted_garbage {
            ", and what an unclean stop left (the next GC looks for it)"
        } else {
            ""
        }
    );
    println!(
        "layer metadata:       {} EROFS images ({}), {} stub trees{}",
        s.image_layers,
        human_bytes(s.image_bytes),
        s.committed - s.image_layers,
        match &s.new_layers {
            Some(n) => format!("; new layers: {n}"),
            None => String::new(),
        }
    );
    if let Some(m) = &s.id_mapped_snapshots {
        println!("ID-mapped snapshots:  {m}");
    }
    if let Some(j) = &s.journal {
        println!("journal:              {j}");
    }
    if let Some(p) = &s.ingest_paths {
        println!(
            "layers since start:   {} applied in one pass (cas-diff), {} ingested at commit, {} handed back, {} failed",
            p.fast_path_applies, p.commit_ingests, p.fallback_applies, p.failed_applies
        );
        if p.blobs_from_content_dir + p.blobs_from_content_api > 0 {
            println!(
                "layer blobs read:     {} from containerd's content directory, {} through its Content API",
                p.blobs_from_content_dir, p.blobs_from_content_api
            );
        }
        if p.partial_layers + p.partial_fallbacks > 0 {
            println!(
                "partial pulls:        {} layers ({} checked against the diffID, {} against the TOC alone), {} of their {} fetched ({} avoided); {} layers with a TOC pulled in full",
                p.partial_layers,
                p.partial_diff_id_verified,
                p.partial_toc_verified,
                human_bytes(p.partial_fetched_bytes),
                human_bytes(p.partial_layer_bytes),
                human_bytes(p.partial_layer_bytes.saturating_sub(p.partial_fetched_bytes)),
                p.partial_fallbacks
            );
        }
        if let Some(b) = &p.io_backend {
            println!("io backend:           {b}");
        }
        if let Some(b) = &p.blob_source {
            println!("layer blobs from:     {b}");
        }
    }
}

fn print_fsck(r: &FsckReport) {
    println!(
        "checked {} objects ({} hashed), {} snapshots, {} files; {} unreferenced objects",
        r.objects, r.objects_verified, r.snapshots, r.files, r.unreferenced_objects
    );
    if r.untracked_garbage > 0 {
        println!(
            "{} unreferenced objects are no GC candidate (left by a crash): the daemon's first GC \
             after its restart, or casctl gc with it stopped, finds them",
            r.untracked_garbage
        );
    }
    for p in &r.problems {
        println!("problem: {}", serde_json::to_string(p).unwrap_or_default());
    }
    if r.problems.is_empty() {
        println!("clean");
    } else {
        println!("{} problems", r.problems.len());
    }
}

fn print_images(images: &[cas::sharing::ChainUsage]) {
    println!(
        "{:<73} {:>6} {:>11} {:>11} {:>11}",
        "image (top layer)", "layers", "objects", "unique", "shared"
    );
    for i in images {
        println!(
            "{:<73} {:>3}/{:<2} {:>11} {:>11} {:>11}",
            i.top,
            i.exclusive_layers,
            i.layers,
            human_bytes(i.object_bytes),
            human_bytes(i.unique_bytes),
            human_bytes(i.shared_bytes)
        );
    }
    println!(
        "unique: freed when the image goes (its own layers' images and the objects no other \
         image has); layers: its own / all"
    );
}

fn print_gc(g: &GcStats) {
    println!(
        "scanned {} objects, removed {} ({}), removed {} temporary files",
        g.scanned,
        g.removed,
        human_bytes(g.freed_bytes),
        g.tmp_removed
    );
}

/// Shows [`Progress`] on standard error: an `indicatif` bar on a terminal, a plain line
/// at each phase's start and end and every 5 s otherwise.
struct ProgressView {
    what: &'static str,
    tty: bool,
    bar: Option<(String, indicatif::ProgressBar)>,
    line_at: Option<std::time::Instant>,
}

impl ProgressView {
    fn new(what: &'static str) -> ProgressView {
        ProgressView {
            what,
            tty: std::io::stderr().is_terminal(),
            bar: None,
            line_at: None,
        }
    }

    fn show(&mut self, p: &Progress) {
        if !self.tty {
            let end = p.total == Some(p.done);
            if end || self.line_at.is_none_or(|t| t.elapsed().as_secs() >= 5) {
                match p.total {
                    Some(t) => eprintln!("{}: {} {}/{t}", self.what, p.phase, p.done),
                    None => eprintln!("{}: {} {}", self.what, p.phase, p.done),
                }
                self.line_at = if end {
                    None
                } else {
                    Some(std::time::Instant::now())
                };
            }
            return;
        }
        if self.bar.as_ref().is_none_or(|(phase, _)| *phase != p.phase) {
            self.finish();
            let bar = match p.total {
                Some(t) => indicatif::ProgressBar::new(t).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                ),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_prefix(format!("{} {}", self.what, p.phase));
            self.bar = Some((p.phase.clone(), bar));
        }
        if let Some((_, bar)) = &self.bar {
            if let Some(t) = p.total {
                bar.set_length(t);
            }
            bar.set_position(p.done);
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish();
        }
    }
}

/// Sends `req` to a running daemon; `None` when no daemon answers. Progress lines
/// before the answer go to `view`.
fn ask_daemon(
    layout: &Layout,
    req: &AdminRequest,
    view: &mut ProgressView,
) -> anyhow::Result<Option<AdminResponse>> {
    let Ok(mut sock) = UnixStream::connect(layout.admin_socket()) else {
        return Ok(None);
    };
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    sock.write_all(&line)?;
    let mut answers = BufReader::new(sock);
    loop {
        let mut answer = String::new();
        if answers.read_line(&mut answer)? == 0 {
            anyhow::bail!("the daemon closed the admin connection without an answer");
        }
        match serde_json::from_str(&answer)? {
            AdminResponse::Progress(p) => view.show(&p),
            resp => {
                view.finish();
                return Ok(Some(resp));
            }
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        cas::layout::is_store(&args.root),
        "{} is not a cas-snapshotter store (no layout file)",
        args.root.display()
    );
    let layout = Layout::ensure(&args.root)?;
    let req = match &args.cmd {
        Cmd::Stats => Some(AdminRequest::Stats),
        Cmd::Fsck { verify_objects } => Some(AdminRequest::Fsck {
            verify_objects: *verify_objects,
        }),
        Cmd::Gc => Some(AdminRequest::Gc),
        Cmd::Images => Some(AdminRequest::Images),
        Cmd::RebuildIndex => None,
    };
    let mut view = ProgressView::new(match &args.cmd {
        Cmd::Fsck { .. } => "fsck",
        Cmd::RebuildIndex => "rebuild",
        _ => "casctl",
    });
    let online = match &req {
        Some(r) => ask_daemon(&layout, r, &mut view)?,
        None => {
            anyhow::ensure!(
                UnixStream::connect(layout.admin_socket()).is_err(),
                "a daemon is serving this store; stop it first (it rebuilds an unreadable index by itself at start)"
            );
            None
        }
    };
    let resp = match (online, &args.cmd) {
        (Some(resp), _) => resp,
        (None, Cmd::RebuildIndex) => {
            let s = admin::rebuild_index_with_progress(&layout, &mut |p| view.show(p))?;
            view.finish();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "rebuilt index: {} snapshots, {} referenced objects, {} directories skipped",
                    s.snapshots, s.referenced_objects, s.skipped_dirs
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        (None, cmd) => {
            let meta = MetaStore::open(&layout.index_dir()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the index ({e}); is a daemon holding it without answering on {}?",
                    layout.admin_socket().display()
                )
            })?;
            match cmd {
                Cmd::Stats => {
                    admin::ensure_counters(&layout, &meta)?;
                    AdminResponse::Stats(Box::new(admin::stats(&layout, &meta)?))
                }
                Cmd::Images => AdminResponse::Images(cas::sharing::chain_usage(&layout, &meta)?),
                Cmd::Fsck { verify_objects } => {
                    let r = fsck::fsck_with_progress(&layout, &meta, *verify_objects, &mut |p| {
                        view.show(p)
                    })?;
                    view.finish();
                    AdminResponse::Fsck(r)
                }
                _ => AdminResponse::Gc(cas::gc::collect(&layout, &meta)?),
            }
        }
    };
    if args.json {
        let v = match &resp {
            AdminResponse::Stats(s) => serde_json::to_string_pretty(s)?,
            AdminResponse::Fsck(r) => serde_json::to_string_pretty(r)?,
            AdminResponse::Gc(g) => serde_json::to_string_pretty(g)?,
            AdminResponse::Images(i) => serde_json::to_string_pretty(i)?,
            AdminResponse::Progress(_) => anyhow::bail!("the daemon answered with progress only"),
            AdminResponse::Error(e) => anyhow::bail!("daemon: {e}"),
        };
        println!("{v}");
    }
    match resp {
        AdminResponse::Stats(s) => {
            if !args.json {
                print_stats(&s);
            }
        }
        AdminResponse::Fsck(r) => {
            if !args.json {
                print_fsck(&r);
            }
            if !r.problems.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        AdminResponse::Gc(g) => {
            if !args.json {
                print_gc(&g);
            }
        }
        AdminResponse::Images(i) => {
            if !args.json {
                print_images(&i);
            }
        }
        AdminResponse::Progress(_) => anyhow::bail!("the daemon answered with progress only"),
        AdminResponse::Error(e) => anyhow::bail!("daemon: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("casctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
