//! `cas-snapshotter --root DIR --address SOCK [--config FILE]`: the daemon.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cas_snapshotter::{ops, server, service::CasSnapshotter};
use clap::Parser;
use config::{Config, LogFormat, LogLevel, Overrides};
use tracing::info;

/// containerd remote snapshotter backed by a deduplicating content-addressed store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Store root (default /var/lib/cas-snapshotter, or `root` in the config file).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on (default /run/cas-snapshotter/snapshotter.sock).
    #[arg(long)]
    address: Option<PathBuf>,
    /// TOML config file (default /etc/cas-snapshotter/config.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log level: trace, debug, info, warn, error.
    #[arg(long)]
    log_level: Option<LogLevel>,
}

fn init_logging(cfg: &Config) -> ops::LogHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // RUST_LOG, when set, decides at start; SIGHUP applies the configured level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| ops::filter_for(cfg.log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let output = match cfg.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    handle
}

fn main() -> ExitCode {
    // Before any thread starts: two malloc arenas, unless the environment chose
    // (see ringio::memory).
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        ringio::memory::limit_arenas(ringio::memory::DAEMON_ARENAS);
    }
    // Crash points (see the `cas` crate) are armed only by FAILPOINTS in the environment.
    let _failpoints = cas::fail::FailScenario::setup();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cas-snapshotter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let overrides = Overrides {
        root: args.root,
        address: args.address,
        log_level: args.log_level,
    };
    let cfg = Config::load(args.config.as_deref(), &overrides)?;
    let log_handle = init_logging(&cfg);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cas-grpc")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let layout = cas::Layout::ensure(&cfg.root)
            .with_context(|| format!("opening store at {}", cfg.root.display()))?;
        let snapshotter = Arc::new(
            CasSnapshotter::open_with(layout, &cfg.store)
                .with_context(|| format!("opening store at {}", cfg.root.display()))?,
        );
        let pool = ringio::Pool::start(&ringio::PoolConfig {
            workers: cfg.ring.workers,
            buffers: cfg.ring.buffers,
            buffer_size: cfg.ring.buffer_size,
            queue_depth: cfg.ring.queue_depth,
            small_writes: cfg.ring.small_writes,
            backend: match cfg.ring.backend {
                config::RingBackend::Auto => ringio::BackendChoice::Auto,
                config::RingBackend::Threads => ringio::BackendChoice::Threads,
            },
        })
        .context("starting the I/O workers")?;
        match pool.fallback_reason() {
            Some(why) => info!(backend = pool.backend().as_str(), reason = %why, "I/O workers started without io_uring"),
            None => info!(backend = pool.backend().as_str(), workers = cfg.ring.workers, "I/O workers started"),
        }
        snapshotter.metrics().attach_pool(pool.clone());
        let limits = cas::unpack::Limits {
            max_bytes: cfg.differ.max_layer_bytes,
            max_ratio: cfg.differ.max_expansion,
            ..cas::unpack::Limits::default()
        };
        snapshotter.attach_remote(cas_snapshotter::remote::Remote::new(
            cfg.remote.clone(),
            pool.clone(),
            limits,
        ));
        let differ = cas_snapshotter::diff::CasDiffer::new(snapshotter.clone(), cfg.differ.clone(), pool);
        differ.report_blob_reach();
        let stop = server::StopSignals::install();
        let listener = server::bind(&cfg.address)?;
        let admin = cas_snapshotter::admin::bind(&snapshotter)?;
        let (gc_tx, gc_rx) = tokio::sync::watch::channel(cfg.gc.interval);
        tokio::spawn(ops::scheduled_gc(snapshotter.clone(), gc_rx));
        let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(cfg.metrics.address);
        tokio::spawn(cas_snapshotter::metrics::serve(snapshotter.clone(), metrics_rx));
        tokio::spawn(
            ops::Reloader::new(
                args.config.clone(),
                overrides.clone(),
                cfg.clone(),
                log_handle,
                gc_tx,
                metrics_tx,
            )
            .run(),
        );
        info!(root = %cfg.root.display(), address = %cfg.address.display(), gc_interval = ?cfg.gc.interval, "serving containerd's Snapshots and Diff APIs");
        server::serve(snapshotter.clone(), differ, listener, &cfg.address, admin, stop).await?;
        snapshotter
            .shutdown()
            .await
            .context("checkpointing the journal at shutdown")?;
        info!("stopped");
        anyhow::Ok(())
    })
}
