//! The daemon's configuration: one TOML file, parsed strictly.
//!
//! Precedence is *defaults < file < command-line flags*. The file is optional: without
//! `--config`, [`DEFAULT_CONFIG_PATH`] is read when it exists; with `--config`, the file
//! must exist. Every key is checked: an unknown key or a value of the wrong kind stops the
//! daemon at start with an error that names both the key (as a dotted path such as
//! `log.level`) and the file, so a typo never silently falls back to a default.
//!
//! ```toml
//! root = "/var/lib/cas-snapshotter"                  # the store (one filesystem)
//! address = "/run/cas-snapshotter/snapshotter.sock"  # containerd's [proxy_plugins.cas] address
//!
//! [log]
//! level = "info"      # trace | debug | info | warn | error
//! format = "text"     # text | json
//!
//! [store]
//! mount_mode = "auto" # auto | data-only | materialised
//! layer_metadata = "auto"  # auto (EROFS images where the kernel mounts them) | erofs | stubs
//! image_mounts = "auto"    # auto (from the image file where the kernel can, else a loop device) | loop
//! journal = "auto"    # auto (RWF_ATOMIC where supported) | rename
//! idmapped_layers = "auto"  # auto (ID-mapped clones of layers where the kernel can) | off
//! index_cache_mib = 8        # the index's (sled's) page cache: the daemon's memory for it
//!
//! [gc]
//! interval = "off"    # off | a duration ("30m", "6h"): scheduled GC
//!
//! [metrics]
//! address = "127.0.0.1:9109"   # Prometheus text at /metrics; absent = off
//!
//! [differ]                     # the Diff service (cas-diff): one-pass layer applies
//! enabled = true
//! content_dir = "/var/lib/containerd/io.containerd.content.v1.content"
//! containerd_address = "/run/containerd/containerd.sock"   # Content API fallback
//! max_layer_bytes = 274877906944   # uncompressed bytes a layer may have
//! max_expansion = 1000             # uncompressed per compressed byte, beyond 1 GiB
//!
//! [ring]                       # I/O workers for blob reads and object writes
//! workers = 2
//! buffers = 16                 # registered buffers per worker
//! buffer_size = 262144
//! queue_depth = 64             # writes queued per worker before producers wait
//! small_writes = 32768         # new objects up to this size: plain threads (0: the ring)
//! backend = "auto"             # auto (io_uring where it works) | threads
//! ```
//!
//! Parsing ([`Config::from_toml`]) is separate from I/O ([`Config::load`]) so every rule
//! is unit-tested on strings. Later sections (GC schedule, metrics, ring sizes) are added
//! as further `#[serde(deny_unknown_fields)]` structs beside [`LogConfig`].
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemon keeps its store when neither the file nor a flag says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/cas-snapshotter";
/// The unix socket containerd dials (`[proxy_plugins.cas] address`).
pub const DEFAULT_ADDRESS: &str = "/run/cas-snapshotter/snapshotter.sock";
/// Read at start when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cas-snapshotter/config.toml";

/// Errors from reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key is unknown, misspelt, or holds a value of the wrong kind.
    #[error("invalid config {origin}: key `{key}`: {message}")]
    Invalid {
        /// The file (or `<string>` when parsed from memory).
        origin: String,
        /// Dotted path of the offending key, e.g. `log.level`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-entry ingest traces.
    Trace,
    /// Per-request detail.
    Debug,
    /// Start, stop, and notable events (default).
    #[default]
    Info,
    /// Things that were handled but deserve a look.
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The name `tracing`'s filters understand.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            other => Err(format!(
                "unknown log level `{other}`, expected one of trace, debug, info, warn, error"
            )),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Verbosity.
    pub level: LogLevel,
    /// Output format.
    pub format: LogFormat,
}

/// How committed layers are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MountMode {
    /// Stubs over the CAS as a data-only lower layer when the kernel can (probed at
    /// start), otherwise materialised (default).
    #[default]
    Auto,
    /// Require stubs over a data-only lower layer; refuse to start without kernel support.
    DataOnly,
    /// Layers keep real files: hardlinks to objects where metadata matches exactly,
    /// reflinks on filesystems that have them, otherwise the file's own copy.
    Materialised,
}

/// How new layers keep their metadata, in a store that serves them from the CAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LayerMetadata {
    /// One EROFS image per layer where the kernel mounts EROFS from a file (probed at
    /// start; Linux 6.12+), otherwise stub trees (default).
    #[default]
    Auto,
    /// EROFS images; refuse to start without kernel support.
    Erofs,
    /// A stub tree per layer (one sparse file per regular file).
    Stubs,
}

/// How commit records are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum JournalKind {
    /// One `pwritev2(RWF_ATOMIC | RWF_DSYNC)` block per record where the store's
    /// filesystem reports atomic write units (`statx`), otherwise `rename` (default).
    #[default]
    Auto,
    /// Always a temp file + fsync + rename per record.
    Rename,
}

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// How committed layers are served. A store keeps the mode it was created with.
    pub mount_mode: MountMode,
    /// How new layers keep their metadata. A store reads both kinds whatever it writes.
    pub layer_metadata: LayerMetadata,
    /// How layer images are mounted.
    pub image_mounts: ImageMounts,
    /// How commit records are made durable.
    pub journal: JournalKind,
    /// How user-namespaced (ID-mapped) snapshots are served.
    pub idmapped_layers: IdmappedLayers,
    /// The index's page cache in MiB (default 8): what bounds the memory the index takes
    /// as the store grows. At least 1.
    #[serde(deserialize_with = "cache_mib")]
    pub index_cache_mib: Option<u64>,
}

fn cache_mib<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom(
            "the index cache must be at least 1 MiB",
        )),
        n if n > 1 << 20 => Err(serde::de::Error::custom(
            "the index cache must be at most 1048576 MiB",
        )),
        n => Ok(Some(n)),
    }
}

/// How layer images are mounted (`[store] image_mounts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ImageMounts {
    /// From the image file where the kernel can (Linux 6.12+), else through a loop
    /// device.
    #[default]
    Auto,
    /// Always through a loop device (one per layer in use).
    Loop,
}

/// How user-namespaced snapshots are served (`[store] idmapped_layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IdmappedLayers {
    /// By ID-mapped clones of the shared layers where the kernel can (probed at
    /// start); containerd then needs `capabilities = ["remap-ids"]` for the plugin.
    #[default]
    Auto,
    /// Never: containerd must chown a copy of the layers (no `remap-ids` declared).
    Off,
}

/// The `[gc]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// How often the daemon collects unreferenced objects by itself, besides
    /// containerd's Cleanup and `casctl gc`: `"off"` (default) or a duration such as
    /// `"30m"` or `"6h"`. Changes take effect on SIGHUP.
    #[serde(deserialize_with = "interval")]
    pub interval: Option<Duration>,
}

fn interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    match humantime::parse_duration(&text) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
        Ok(_) => Err(serde::de::Error::custom(
            "an interval must be at least 1s (or \"off\")",
        )),
        Err(e) => Err(serde::de::Error::custom(format!(
            "`{text}` is not \"off\" or a duration such as \"30m\" or \"6h\": {e}"
        ))),
    }
}

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus text metrics are served (`http://<address>/metrics`), e.g.
    /// `"127.0.0.1:9109"`. Absent: off (default). Changes take effect on SIGHUP.
    pub address: Option<std::net::SocketAddr>,
}

/// Default of `[differ] content_dir`: the content store of containerd's default root.
pub const DEFAULT_CONTENT_DIR: &str = "/var/lib/containerd/io.containerd.content.v1.content";
/// Default of `[differ] containerd_address`: containerd's default socket.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

/// The `[differ]` section: the Diff service (`cas-diff`) that applies layers in one pass.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DifferConfig {
    /// Serve the Diff service on the socket (default true). Off, every Apply answers
    /// `Unimplemented` and containerd falls back to its own applier.
    pub enabled: bool,
    /// containerd's content store directory; blobs are read from `blobs/sha256/…` here
    /// when readable, otherwise streamed through containerd's Content API.
    pub content_dir: PathBuf,
    /// containerd's socket, for the Content API.
    pub containerd_address: PathBuf,
    /// Uncompressed bytes a layer may expand to, whatever its blob size.
    pub max_layer_bytes: u64,
    /// Uncompressed bytes allowed per compressed byte beyond 1 GiB (decompression bombs).
    pub max_expansion: u64,
}

impl Default for DifferConfig {
    fn default() -> Self {
        DifferConfig {
            enabled: true,
            content_dir: PathBuf::from(DEFAULT_CONTENT_DIR),
            containerd_address: PathBuf::from(DEFAULT_CONTAINERD_ADDRESS),
            max_layer_bytes: 256 << 30,
            max_expansion: 1000,
        }
    }
}

/// What a partial pull must prove of a layer before it is used instead of a full pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteVerify {
    /// The rebuilt archive's digest must be the image config's diffID: only layers with
    /// a tar-split are pulled partially (default).
    #[default]
    DiffId,
    /// Layers without a tar-split are pulled partially too, checked against the TOC
    /// (its digest from the manifest, every file by its digest).
    Toc,
}

/// Default of `[remote] config_path`: containerd's usual directory of `hosts.toml`.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// The `[remote]` section: partial pulls of zstd:chunked layers, when containerd passes
/// the layer's labels on Prepare (remote snapshot annotations).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Pull layers that have a TOC partially (default true); off, every layer is
    /// fetched and applied by containerd.
    pub enabled: bool,
    /// What a partial pull must prove.
    pub verify: RemoteVerify,
    /// Range requests in flight per layer.
    pub parallel: usize,
    /// Longest range request, in bytes.
    pub max_request_bytes: u64,
    /// Ranges at most this many bytes apart are fetched as one.
    pub max_gap_bytes: u64,
    /// Connect and read timeout of each request, in seconds.
    pub timeout_secs: u64,
    /// containerd's `config_path`: `<dir>/<host>/hosts.toml` (mirrors, plain HTTP, CA
    /// files).
    pub config_path: PathBuf,
    /// A docker `config.json` with registry credentials (none when absent).
    pub docker_config: PathBuf,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            enabled: true,
            verify: RemoteVerify::DiffId,
            parallel: 8,
            max_request_bytes: 4 << 20,
            max_gap_bytes: 16 << 10,
            timeout_secs: 30,
            config_path: PathBuf::from(DEFAULT_HOSTS_DIR),
            docker_config: PathBuf::from("/root/.docker/config.json"),
        }
    }
}

/// Which I/O backend the `[ring]` workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RingBackend {
    /// io_uring where the kernel allows it (probed at start), otherwise threads (default).
    #[default]
    Auto,
    /// Plain threads with pread/pwrite.
    Threads,
}

/// The `[ring]` section: the I/O workers that read blobs and write new objects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    /// Worker threads, each with its own ring and buffers.
    pub workers: usize,
    /// Registered buffers per worker.
    pub buffers: usize,
    /// Bytes per buffer.
    pub buffer_size: usize,
    /// Writes queued per worker before producers wait (backpressure).
    pub queue_depth: usize,
    /// New objects of at most this many bytes are written by plain threads beside the
    /// io_uring workers (0: every write goes through the ring).
    pub small_writes: usize,
    /// io_uring or plain threads.
    pub backend: RingBackend,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            workers: 2,
            buffers: 16,
            buffer_size: 256 << 10,
            queue_depth: 64,
            small_writes: 32 << 10,
            backend: RingBackend::Auto,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of the store; everything the daemon writes lives below it.
    pub root: PathBuf,
    /// Unix socket to serve on.
    pub address: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// The store.
    pub store: StoreConfig,
    /// Scheduled garbage collection.
    pub gc: GcConfig,
    /// The metrics endpoint.
    pub metrics: MetricsConfig,
    /// The Diff service.
    pub differ: DifferConfig,
    /// Partial pulls.
    pub remote: RemoteConfig,
    /// The I/O workers.
    pub ring: RingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            log: LogConfig::default(),
            store: StoreConfig::default(),
            gc: GcConfig::default(),
            metrics: MetricsConfig::default(),
            differ: DifferConfig::default(),
            remote: RemoteConfig::default(),
            ring: RingConfig::default(),
        }
    }
}

/// Values given on the command line; each one that is set wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--root`
    pub root: Option<PathBuf>,
    /// `--address`
    pub address: Option<PathBuf>,
    /// `--log-level`
    pub log_level: Option<LogLevel>,
}

impl Config {
    /// Parses a TOML document. `origin` names it in errors (usually the file's path).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                origin: origin.to_string(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: e.inner().message().trim().to_string(),
            }
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        };
        if !self.root.is_absolute() {
            return Err(invalid("root", "must be an absolute path"));
        }
        if !self.address.is_absolute() {
            return Err(invalid(
                "address",
                "must be an absolute path to a unix socket",
            ));
        }
        if !self.differ.content_dir.is_absolute() {
            return Err(invalid("differ.content_dir", "must be an absolute path"));
        }
        if !self.differ.containerd_address.is_absolute() {
            return Err(invalid(
                "differ.containerd_address",
                "must be an absolute path to a unix socket",
            ));
        }
        if self.differ.max_expansion == 0 || self.differ.max_layer_bytes == 0 {
            return Err(invalid(
                "differ",
                "max_expansion and max_layer_bytes must be positive",
            ));
        }
        let p = &self.remote;
        if p.parallel == 0 || p.parallel > 64 {
            return Err(invalid("remote.parallel", "must be between 1 and 64"));
        }
        if p.max_request_bytes < 4096 || p.timeout_secs == 0 {
            return Err(invalid(
                "remote",
                "max_request_bytes must be at least 4096 and timeout_secs positive",
            ));
        }
        let r = &self.ring;
        if r.workers == 0 || r.workers > 64 {
            return Err(invalid("ring.workers", "must be between 1 and 64"));
        }
        if r.buffers == 0 || r.queue_depth == 0 {
            return Err(invalid("ring", "buffers and queue_depth must be positive"));
        }
        if r.buffer_size < 4096 || r.buffer_size > 16 << 20 || !r.buffer_size.is_multiple_of(4096) {
            return Err(invalid(
                "ring.buffer_size",
                "must be a multiple of 4096 between 4 KiB and 16 MiB",
            ));
        }
        Ok(())
    }

    /// Loads the configuration: `path` if given (it must exist), else
    /// [`DEFAULT_CONFIG_PATH`] when present, else defaults; then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::read_file(p)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::read_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Config::default(),
        };
        cfg.apply(overrides);
        cfg.validate("command line")?;
        Ok(cfg)
    }

    fn read_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(root) = &o.root {
            self.root = root.clone();
        }
        if let Some(address) = &o.address {
            self.address = address.clone();
        }
        if let Some(level) = o.log_level {
            self.log.level = level;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("", "t").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let cfg = Config::from_toml(
            "root = \"/srv/cas\"\naddress = \"/run/x.sock\"\n[log]\nlevel = \"debug\"\nformat = \"json\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.root, PathBuf::from("/srv/cas"));
        assert_eq!(cfg.address, PathBuf::from("/run/x.sock"));
        assert_eq!(cfg.log.level, LogLevel::Debug);
        assert_eq!(cfg.log.format, LogFormat::Json);
        let cfg = Config::from_toml("[store]\nmount_mode = \"materialised\"\n", "t").unwrap();
        assert_eq!(cfg.store.mount_mode, MountMode::Materialised);
        assert_eq!(cfg.store.journal, JournalKind::Auto);
        assert!(Config::from_toml("[store]\nmount_mode = \"fuse\"\n", "t").is_err());
        let cfg = Config::from_toml("[store]\nlayer_metadata = \"stubs\"\n", "t").unwrap();
        assert_eq!(cfg.store.layer_metadata, LayerMetadata::Stubs);
        assert!(Config::from_toml("[store]\nlayer_metadata = \"composefs\"\n", "t").is_err());
        let cfg = Config::from_toml("[store]\nimage_mounts = \"loop\"\n", "t").unwrap();
        assert_eq!(cfg.store.image_mounts, ImageMounts::Loop);
        assert!(Config::from_toml("[store]\nimage_mounts = \"file\"\n", "t").is_err());
        let cfg = Config::from_toml("[store]\nidmapped_layers = \"off\"\n", "t").unwrap();
        assert_eq!(cfg.store.idmapped_layers, IdmappedLayers::Off);
        assert!(Config::from_toml("[store]\nidmapped_layers = true\n", "t").is_err());
        let cfg = Config::from_toml("[store]\nindex_cache_mib = 8\n", "t").unwrap();
        assert_eq!(cfg.store.index_cache_mib, Some(8));
        let e = Config::from_toml("[store]\nindex_cache_mib = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("store.index_cache_mib"), "{e}");
        let cfg = Config::from_toml("[store]\njournal = \"rename\"\n", "t").unwrap();
        assert_eq!(cfg.store.journal, JournalKind::Rename);
    }

    #[test]
    fn gc_interval_is_off_or_a_duration() {
        assert_eq!(Config::default().gc.interval, None);
        let gc = |v: &str| Config::from_toml(&format!("[gc]\ninterval = \"{v}\"\n"), "g.toml");
        assert_eq!(gc("off").unwrap().gc.interval, None);
        assert_eq!(
            gc("30m").unwrap().gc.interval,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            gc("1h 30m").unwrap().gc.interval,
            Some(Duration::from_secs(5400))
        );
        let m = Config::from_toml("[metrics]\naddress = \"127.0.0.1:9109\"\n", "m").unwrap();
        assert_eq!(m.metrics.address, Some("127.0.0.1:9109".parse().unwrap()));
        assert!(Config::from_toml("[metrics]\naddress = \"localhost\"\n", "m").is_err());
        for bad in ["often", "0s", "10ms", ""] {
            let msg = gc(bad).unwrap_err().to_string();
            assert!(
                msg.contains("gc.interval") && msg.contains("g.toml"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn differ_and_ring_sections_parse_and_validate() {
        let d = Config::default();
        assert!(d.differ.enabled);
        assert_eq!(d.ring.workers, 2);
        let cfg = Config::from_toml(
            "[differ]\nenabled = false\ncontent_dir = \"/srv/c\"\nmax_expansion = 50\n[ring]\nworkers = 4\nbackend = \"threads\"\n",
            "t",
        )
        .unwrap();
        assert!(!cfg.differ.enabled);
        assert_eq!(cfg.differ.content_dir, PathBuf::from("/srv/c"));
        assert_eq!(cfg.differ.max_expansion, 50);
        assert_eq!(cfg.ring.workers, 4);
        assert_eq!(cfg.ring.backend, RingBackend::Threads);
        for (bad, key) in [
            ("[ring]\nworkers = 0\n", "ring.workers"),
            ("[ring]\nbuffer_size = 1000\n", "ring.buffer_size"),
            ("[ring]\nbackend = \"uring\"\n", "ring.backend"),
            ("[differ]\ncontent_dir = \"rel\"\n", "differ.content_dir"),
            ("[differ]\nspeed = 1\n", "speed"),
        ] {
            let msg = Config::from_toml(bad, "f.toml").unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains("f.toml"), "{bad}: {msg}");
        }
    }

    #[test]
    fn unknown_top_level_key_names_key_and_file() {
        let err = Config::from_toml("rooot = \"/x\"\n", "/etc/c.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/c.toml"), "{msg}");
        assert!(msg.contains("rooot"), "{msg}");
    }

    #[test]
    fn unknown_nested_key_names_section() {
        let err = Config::from_toml("[log]\nlevle = \"debug\"\n", "f.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("levle") && msg.contains("log"), "{msg}");
        assert!(msg.contains("f.toml"), "{msg}");
    }

    #[test]
    fn bad_value_names_key() {
        let err = Config::from_toml("[log]\nlevel = \"loud\"\n", "f.toml").unwrap_err();
        match &err {
            ConfigError::Invalid { key, message, .. } => {
                assert_eq!(key, "log.level");
                assert!(message.contains("loud"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Config::from_toml("root = 5\n", "f.toml").unwrap_err();
        assert!(err.to_string().contains("`root`"), "{err}");
    }

    #[test]
    fn relative_paths_are_rejected() {
        let err = Config::from_toml("root = \"rel\"\n", "f.toml").unwrap_err();
        assert!(err.to_string().contains("`root`"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "root = \"/a\"\n[log]\nlevel = \"warn\"\n").unwrap();
        let cfg = Config::load(
            Some(&path),
            &Overrides {
                root: Some("/b".into()),
                address: None,
                log_level: Some(LogLevel::Trace),
            },
        )
        .unwrap();
        assert_eq!(cfg.root, PathBuf::from("/b"));
        assert_eq!(cfg.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(cfg.log.level, LogLevel::Trace);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/c.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
