//! Registry access for partial pulls, configured as containerd's is.
//!
//! The HTTP side is `oci-client` (the OCI Distribution client of the ORAS project):
//! manifests by digest, blob ranges, the token flow of `WWW-Authenticate` challenges
//! (bearer and basic), HTTPS with the system's roots through rustls. What containerd
//! users already configure is read the way containerd reads it:
//!
//! * `hosts.toml` under `config_path` (`<config_path>/<host>/hosts.toml`, then
//!   `<config_path>/_default/hosts.toml`): a `server` or `[host."…"]` address with
//!   `http://` makes the registry plain HTTP, `ca` adds CA files, `skip_verify` turns
//!   certificate checks off. The first `[host]` entry that can `pull` is where blobs
//!   are read (a mirror), the registry itself otherwise;
//! * credentials from a docker `config.json` (`auths`, `credHelpers`, `credsStore`),
//!   through the `docker_credential` crate.
//!
//! A range request must be answered `206 Partial Content` with exactly the bytes asked
//! for: a registry that sends the whole blob (`200`) or fewer bytes fails the fetch,
//! and the caller pulls the layer in full instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use tracing::debug;

/// How the registries are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryOptions {
    /// containerd's `config_path` (directories of `hosts.toml`), if any.
    pub config_path: Option<PathBuf>,
    /// A docker `config.json` with credentials, if any.
    pub docker_config: Option<PathBuf>,
    /// Connect and read timeout of each request.
    pub timeout: Option<Duration>,
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("image reference {reference:?}: {reason}")]
    Reference {
        /// The reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// A `hosts.toml` is malformed.
    #[error("{path}: {reason}")]
    Hosts {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The registry refused or failed the request.
    #[error("{what} from {registry}: {reason}")]
    Request {
        /// What was asked.
        what: String,
        /// The registry.
        registry: String,
        /// Its answer.
        reason: String,
    },
    /// A range request was not answered with exactly that range.
    #[error("{registry} did not answer the range request for {digest} bytes {start}..{end} with those bytes: {reason}")]
    Range {
        /// The registry.
        registry: String,
        /// The blob.
        digest: String,
        /// First byte asked for.
        start: u64,
        /// One past the last.
        end: u64,
        /// What came instead.
        reason: String,
    },
}

/// One host `hosts.toml` says to pull a registry's content from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HostConfig {
    /// `host[:port]`.
    host: String,
    plain_http: bool,
    ca_files: Vec<PathBuf>,
    skip_verify: bool,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct HostsToml {
    server: Option<String>,
    ca: Option<StringOrList>,
    skip_verify: Option<bool>,
    host: toml::Table,
}

#[derive(serde::Deserialize, Clone)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn paths(&self, base: &Path) -> Vec<PathBuf> {
        let v = match self {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        };
        v.into_iter().map(|p| base.join(p)).collect()
    }
}

/// `scheme://host[:port][/path]` → (`host[:port]`, plain HTTP).
fn split_url(url: &str) -> (String, bool) {
    let (plain, rest) = match url.split_once("://") {
        Some(("http", r)) => (true, r),
        Some((_, r)) => (false, r),
        None => (false, url),
    };
    (rest.split('/').next().unwrap_or(rest).to_string(), plain)
}

/// The hosts to pull `registry`'s content from, in the order they are tried: the
/// `[host]` entries that can pull, as `hosts.toml` under `config_path` lists them, then
/// its `server` (the registry itself when none is given), as containerd tries them.
fn host_config(
    config_path: &Path,
    registry: &str,
    default_host: &str,
) -> Result<Vec<HostConfig>, RegistryError> {
    let server_default = HostConfig {
        host: default_host.to_string(),
        ..HostConfig::default()
    };
    let mut file = config_path.join(registry).join("hosts.toml");
    if !file.exists() {
        file = config_path.join("_default").join("hosts.toml");
        if !file.exists() {
            return Ok(vec![server_default]);
        }
    }
    let text = std::fs::read_to_string(&file).map_err(|e| RegistryError::Hosts {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    let parsed: HostsToml = toml::from_str(&text).map_err(|e| RegistryError::Hosts {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    let base = file.parent().unwrap_or(config_path).to_path_buf();
    let mut server = server_default;
    if let Some(url) = &parsed.server {
        let (host, plain) = split_url(url);
        server.host = host;
        server.plain_http = plain;
    }
    if let Some(ca) = &parsed.ca {
        server.ca_files = ca.paths(&base);
    }
    server.skip_verify = parsed.skip_verify.unwrap_or(false);
    let mut out = Vec::new();
    for (url, table) in &parsed.host {
        let caps: Vec<String> = table
            .get("capabilities")
            .and_then(|c| c.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_else(|| vec!["pull".into(), "resolve".into()]);
        if !caps.iter().any(|c| c == "pull") {
            continue;
        }
        let (host, plain_http) = split_url(url);
        let ca_files = match table.get("ca") {
            Some(ca) => {
                let ca: StringOrList =
                    ca.clone()
                        .try_into()
                        .map_err(|e: toml::de::Error| RegistryError::Hosts {
                            path: file.clone(),
                            reason: e.to_string(),
                        })?;
                ca.paths(&base)
            }
            None => Vec::new(),
        };
        let skip_verify = table
            .get("skip_verify")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        out.push(HostConfig {
            host,
            plain_http,
            ca_files,
            skip_verify,
        });
    }
    if !out.iter().any(|h| h.host == server.host) {
        out.push(server);
    }
    Ok(out)
}

/// Clients of the registries, one per host and TLS settings (they are per client).
pub struct Registries {
    opts: RegistryOptions,
    clients: Mutex<HashMap<String, Arc<Client>>>,
    /// Manifests and configs fetched lately, by digest (checked against it when
    /// fetched), newest last.
    recent: Mutex<std::collections::VecDeque<(String, Arc<Vec<u8>>)>>,
}

/// Manifests and configs kept by [`Registries::remember`].
pub const RECENT_BLOBS: usize = 64;

/// One image's repository on its registry, ready for requests: on each of the hosts
/// to pull it from, tried in order from the one that answered last.
pub struct Repository {
    endpoints: Vec<Endpoint>,
    current: std::sync::atomic::AtomicUsize,
}

/// The repository on one host.
struct Endpoint {
    client: Arc<Client>,
    reference: Reference,
    registry: String,
    auth: RegistryAuth,
}

impl Registries {
    /// Registries reached as `opts` says.
    pub fn new(opts: RegistryOptions) -> Registries {
        // rustls's process-wide crypto provider (ring); a second install is a no-op
        let _ = rustls::crypto::ring::default_provider().install_default();
        Registries {
            opts,
            clients: Mutex::new(HashMap::new()),
            recent: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// The manifest or config `digest`, if fetched lately.
    pub fn cached(&self, digest: &str) -> Option<Arc<Vec<u8>>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, b)| b.clone())
    }

    /// Keeps `bytes`, fetched by `digest` and checked against it, for [`Self::cached`]
    /// (the last [`RECENT_BLOBS`]).
    pub fn remember(&self, digest: &str, bytes: Vec<u8>) -> Arc<Vec<u8>> {
        let bytes = Arc::new(bytes);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if !recent.iter().any(|(d, _)| d == digest) {
            if recent.len() >= RECENT_BLOBS {
                recent.pop_front();
            }
            recent.push_back((digest.to_string(), bytes.clone()));
        }
        bytes
    }

    fn credentials(&self, registry: &str) -> RegistryAuth {
        let Some(path) = &self.opts.docker_config else {
            return RegistryAuth::Anonymous;
        };
        let Ok(file) = std::fs::File::open(path) else {
            return RegistryAuth::Anonymous;
        };
        match docker_credential::get_credential_from_reader(file, registry) {
            Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
                RegistryAuth::Basic(u, p)
            }
            Ok(docker_credential::DockerCredential::IdentityToken(t)) => RegistryAuth::Bearer(t),
            Err(e) => {
                debug!(registry, error = %e, "no credentials for the registry; anonymous");
                RegistryAuth::Anonymous
            }
        }
    }

    /// The repository of `image_ref` (a reference such as containerd's
    /// `cri.image-ref` label), authenticated for pulls on each host that lets us.
    pub async fn repository(&self, image_ref: &str) -> Result<Repository, RegistryError> {
        let reference: Reference =
            image_ref
                .parse()
                .map_err(|e: oci_client::ParseError| RegistryError::Reference {
                    reference: image_ref.to_string(),
                    reason: e.to_string(),
                })?;
        let default_host = reference.resolve_registry().to_string();
        let hosts = match &self.opts.config_path {
            Some(p) => host_config(p, reference.registry(), &default_host)?,
            None => vec![HostConfig {
                host: default_host.clone(),
                ..HostConfig::default()
            }],
        };
        let mut endpoints = Vec::new();
        let mut first_error = None;
        for h in hosts {
            match self.endpoint(&reference, &default_host, &h).await {
                Ok(e) => endpoints.push(e),
                Err(e) => {
                    debug!(host = %h.host, error = %e, "host not usable; the next one");
                    first_error.get_or_insert(e);
                }
            }
        }
        if endpoints.is_empty() {
            return Err(first_error.expect("at least one host"));
        }
        Ok(Repository {
            endpoints,
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    async fn endpoint(
        &self,
        reference: &Reference,
        default_host: &str,
        h: &HostConfig,
    ) -> Result<Endpoint, RegistryError> {
        let mut reference = reference.clone();
        if h.host != reference.registry() && h.host != default_host {
            reference.set_mirror_registry(h.host.clone());
        }
        let client = {
            // one client per host and TLS settings: a hosts.toml that changes them gets
            // a new one
            let key = format!(
                "{} plain={} skip_verify={} ca={:?}",
                h.host, h.plain_http, h.skip_verify, h.ca_files
            );
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            match clients.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(self.client(&h.host, h)?);
                    clients.insert(key, c.clone());
                    c
                }
            }
        };
        // the host reached (a mirror), then the registry itself
        let auth = match self.credentials(&h.host) {
            RegistryAuth::Anonymous => self.credentials(reference.registry()),
            found => found,
        };
        client
            .auth(&reference, &auth, RegistryOperation::Pull)
            .await
            .map_err(|e| RegistryError::Request {
                what: "authentication".into(),
                registry: h.host.clone(),
                reason: e.to_string(),
            })?;
        Ok(Endpoint {
            client,
            reference,
            registry: h.host.clone(),
            auth,
        })
    }

    fn client(&self, host: &str, cfg: &HostConfig) -> Result<Client, RegistryError> {
        let mut certs = Vec::new();
        for f in &cfg.ca_files {
            let data = std::fs::read(f).map_err(|e| RegistryError::Hosts {
                path: f.clone(),
                reason: e.to_string(),
            })?;
            certs.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if cfg.plain_http {
                ClientProtocol::HttpsExcept(vec![host.to_string()])
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: cfg.skip_verify,
            extra_root_certificates: certs,
            connect_timeout: self.opts.timeout,
            read_timeout: self.opts.timeout,
            ..ClientConfig::default()
        };
        Ok(Client::new(config))
    }
}

impl Repository {
    /// Where requests go now (the registry, or a mirror).
    pub fn registry(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.endpoints[i.min(self.endpoints.len() - 1)].registry
    }

    /// Runs `op` on the hosts in turn, from the one that answered last, until one
    /// succeeds; the first host's error otherwise.
    async fn on_hosts<'a, T, F, Fut>(&'a self, op: F) -> Result<T, RegistryError>
    where
        F: Fn(&'a Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut first_error = None;
        for k in 0..n {
            let i = (start + k) % n;
            match op(&self.endpoints[i]).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    if n > 1 {
                        debug!(host = %self.endpoints[i].registry, error = %e, "request failed; the next host");
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("at least one host"))
    }

    /// The manifest `digest` of this repository, its bytes checked against the digest.
    pub async fn manifest(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        self.on_hosts(|e| e.manifest(digest)).await
    }

    /// The whole blob `digest` (small ones: image configs), checked against the digest.
    pub async fn blob(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        self.on_hosts(|e| e.blob(digest)).await
    }

    /// Bytes `start..end` of the blob `digest`.
    pub async fn range(
        &self,
        digest: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        self.on_hosts(|e| e.range(digest, start, end)).await
    }
}

impl Endpoint {
    fn request_error(&self, what: String, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Request {
            what,
            registry: self.registry.clone(),
            reason: e.to_string(),
        }
    }

    /// The manifest `digest` of this repository, its bytes checked against the digest.
    async fn manifest(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let r = self.reference.clone_with_digest(digest.to_string());
        let (bytes, _) = self
            .client
            .pull_manifest_raw(
                &r,
                &self.auth,
                &[
                    oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
                    oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE,
                ],
            )
            .await
            .map_err(|e| self.request_error(format!("manifest {digest}"), e))?;
        Ok(bytes.to_vec())
    }

    /// The whole blob `digest` (small ones: image configs), checked against the digest.
    async fn blob(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        self.client
            .pull_blob(&self.reference, digest, &mut out)
            .await
            .map_err(|e| self.request_error(format!("blob {digest}"), e))?;
        Ok(out)
    }

    /// Bytes `start..end` of the blob `digest`.
    async fn range(&self, digest: &str, start: u64, end: u64) -> Result<Vec<u8>, RegistryError> {
        let fail = |reason: String| RegistryError::Range {
            registry: self.registry.clone(),
            digest: digest.to_string(),
            start,
            end,
            reason,
        };
        let response = self
            .client
            .pull_blob_stream_partial(&self.reference, digest, start, Some(end - start))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut stream = match response {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(_) => {
                return Err(fail("200 OK with the whole blob (no range support)".into()))
            }
        };
        let want = (end - start) as usize;
        let mut out = Vec::with_capacity(want);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(format!("connection lost: {e}")))?;
            if out.len() + chunk.len() > want {
                return Err(fail("more bytes than asked for".into()));
            }
            out.extend_from_slice(&chunk);
        }
        if out.len() != want {
            return Err(fail(format!("{} bytes of {want}", out.len())));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_manifests_are_kept_by_digest_up_to_a_bound() {
        let r = Registries::new(RegistryOptions::default());
        assert!(r.cached("sha256:a").is_none());
        r.remember("sha256:a", b"one".to_vec());
        assert_eq!(r.cached("sha256:a").unwrap().as_slice(), b"one");
        for i in 0..RECENT_BLOBS {
            r.remember(&format!("sha256:{i}"), vec![i as u8]);
        }
        assert!(r.cached("sha256:a").is_none(), "the oldest goes first");
        assert!(r.cached(&format!("sha256:{}", RECENT_BLOBS - 1)).is_some());
    }

    #[test]
    fn hosts_toml_gives_the_hosts_in_order_with_plain_http_and_ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |host: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(host)).unwrap();
            std::fs::write(dir.path().join(host).join("hosts.toml"), text).unwrap();
        };
        let host = |h: &str, plain_http: bool| HostConfig {
            host: h.into(),
            plain_http,
            ..HostConfig::default()
        };
        write("127.0.0.1:5000", "server = \"http://127.0.0.1:5000\"\n");
        write(
            "docker.io",
            r#"server = "https://registry-1.docker.io"
[host."http://10.0.0.9:5000"]
  capabilities = ["pull", "resolve"]
  ca = "mirror.pem"
[host."https://push-only.example"]
  capabilities = ["push"]
[host."https://10.0.0.1"]
  skip_verify = true
"#,
        );
        write("_default", "skip_verify = true\n");
        assert_eq!(
            host_config(dir.path(), "127.0.0.1:5000", "127.0.0.1:5000").unwrap(),
            vec![host("127.0.0.1:5000", true)]
        );
        // the [host] entries in the file's order (not sorted), those that can pull, then
        // the server
        let c = host_config(dir.path(), "docker.io", "index.docker.io").unwrap();
        assert_eq!(
            c,
            vec![
                HostConfig {
                    ca_files: vec![dir.path().join("docker.io/mirror.pem")],
                    ..host("10.0.0.9:5000", true)
                },
                HostConfig {
                    skip_verify: true,
                    ..host("10.0.0.1", false)
                },
                host("registry-1.docker.io", false),
            ]
        );
        // no file of its own: _default's settings on the registry itself
        assert_eq!(
            host_config(dir.path(), "quay.io", "quay.io").unwrap(),
            vec![HostConfig {
                skip_verify: true,
                ..host("quay.io", false)
            }]
        );
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            host_config(none.path(), "quay.io", "quay.io").unwrap(),
            vec![host("quay.io", false)]
        );
        write("bad.example", "server = [\n");
        let e = host_config(dir.path(), "bad.example", "bad.example").unwrap_err();
        assert!(e.to_string().contains("hosts.toml"), "{e}");
    }
}
