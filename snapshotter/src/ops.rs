//! Running operations: configuration reload on SIGHUP and scheduled garbage collection.
//!
//! On SIGHUP the configuration is read again exactly as at start (the same file, the
//! same command-line overrides on top). What can change safely while serving is
//! applied at once: the log level, the GC interval and the metrics address. Everything else (root, socket,
//! store settings, log format) keeps its running value, and the log says that a restart
//! is needed for it. A file that does not parse or validate changes nothing: the error
//! is logged and the previous configuration stays.
//!
//! Scheduled GC (`[gc] interval`) runs the same collection as containerd's Cleanup and
//! `casctl gc`, under the same locks, so it is safe against concurrent pulls.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::{Config, LogLevel, Overrides};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::service::CasSnapshotter;

/// Changes the running log filter.
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// The filter for a configured level (third-party crates stay quieter).
pub fn filter_for(level: LogLevel) -> EnvFilter {
    EnvFilter::new(format!("{level},sled=warn,h2=warn,tower=warn"))
}

/// Re-reads the configuration on SIGHUP and applies what can change while serving.
pub struct Reloader {
    path: Option<PathBuf>,
    overrides: Overrides,
    running: Config,
    log: LogHandle,
    gc: watch::Sender<Option<Duration>>,
    metrics: watch::Sender<Option<std::net::SocketAddr>>,
}

impl Reloader {
    /// `running` is the configuration the daemon started with; `gc` feeds
    /// [`scheduled_gc`], `metrics` feeds [`crate::metrics::serve`].
    pub fn new(
        path: Option<PathBuf>,
        overrides: Overrides,
        running: Config,
        log: LogHandle,
        gc: watch::Sender<Option<Duration>>,
        metrics: watch::Sender<Option<std::net::SocketAddr>>,
    ) -> Reloader {
        Reloader {
            path,
            overrides,
            running,
            log,
            gc,
            metrics,
        }
    }

    /// Waits for SIGHUP, forever.
    pub async fn run(mut self) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot install a SIGHUP handler; configuration reload is off");
            return;
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP received, reloading the configuration");
            self.reload();
        }
    }

    /// Reads the configuration again and applies it.
    pub fn reload(&mut self) {
        let new = match Config::load(self.path.as_deref(), &self.overrides) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "configuration reload failed; keeping the previous configuration");
                return;
            }
        };
        let restart = |what: &str| {
            warn!(
                setting = what,
                "changed in the configuration; takes effect after a restart"
            )
        };
        if new.root != self.running.root {
            restart("root");
        }
        if new.address != self.running.address {
            restart("address");
        }
        if new.store != self.running.store {
            restart("store");
        }
        if new.remote != self.running.remote {
            restart("remote");
        }
        if new.log.format != self.running.log.format {
            restart("log.format");
        }
        if new.log.level != self.running.log.level {
            match self.log.reload(filter_for(new.log.level)) {
                Ok(()) => {
                    self.running.log.level = new.log.level;
                    info!(level = %new.log.level, "log level changed");
                }
                Err(e) => error!(error = %e, "cannot change the log level"),
            }
        }
        if new.gc != self.running.gc {
            self.running.gc = new.gc.clone();
            let _ = self.gc.send(new.gc.interval);
            info!(interval = ?new.gc.interval, "GC schedule changed");
        }
        if new.metrics != self.running.metrics {
            self.running.metrics = new.metrics.clone();
            let _ = self.metrics.send(new.metrics.address);
            info!(address = ?new.metrics.address, "metrics address changed");
        }
        info!("configuration reloaded");
    }
}

/// Collects garbage every interval the channel holds (`None`: not at all), forever.
pub async fn scheduled_gc(
    sn: Arc<CasSnapshotter>,
    mut interval: watch::Receiver<Option<Duration>>,
) {
    loop {
        let current = *interval.borrow_and_update();
        match current {
            None => {
                if interval.changed().await.is_err() {
                    return;
                }
            }
            Some(every) => {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {
                        info!(?every, "scheduled garbage collection");
                        if let Err(e) = sn.gc().await {
                            warn!(error = %e, "scheduled garbage collection failed");
                        }
                    }
                    changed = interval.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}
