//! The configuration a private containerd gets: `[proxy_plugins.cas]`, `cas-diff` where
//! the version has proxy differs, the transfer service's unpack entries, CRI; and our
//! daemon's `[differ]` section pointing at that containerd.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::*;

/// The CRI plugin, for Kubernetes' view of the snapshotter (containerd 2.x only).
#[derive(Debug, Clone)]
pub struct CriOptions {
    /// The pinned sandbox ("pause") image, pulled through our snapshotter like any other.
    pub sandbox_image: String,
    /// The runc binary CRI's containers run with (`BinaryName`), if not the system's.
    pub runc: Option<PathBuf>,
}

/// How a test's containerd is set up.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Which binaries.
    pub bin: ContainerdBin,
    /// Whether to declare our differ (`[proxy_plugins.cas-diff]`, first in the diff
    /// service's order and, on 2.x, the transfer service's differ for `cas`). Ignored
    /// before 1.7.4, which does not know proxy differs.
    pub with_differ: bool,
    /// The CRI plugin (disabled when `None`).
    pub cri: Option<CriOptions>,
    /// Registries (`host:port`) that containerd itself (the transfer service, CRI) reaches
    /// over plain HTTP; `ctr --plain-http` covers only pulls that ctr does itself.
    pub plain_http_registries: Vec<String>,
    /// Our store's root, exported for the proxy plugin (`[proxy_plugins.cas.exports]
    /// root`): CRI reports it as the image filesystem's mountpoint, where kubelet reads
    /// its capacity. Written for 2.x, where CRI reads it.
    pub snapshotter_root: Option<PathBuf>,
    /// Whether to declare the `remap-ids` capability for our snapshotter (2.x; on by
    /// default): containerd then hands user namespaces' mappings to Prepare instead of
    /// chowning a copy.
    pub remap_ids: bool,
    /// Whether 2.x passes the layers' labels to Prepare (`[proxy_plugins.cas.exports]
    /// enable_remote_snapshot_annotations`), for partial pulls.
    pub remote_snapshot_annotations: bool,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            bin: ContainerdBin::System,
            with_differ: false,
            cri: None,
            plain_http_registries: Vec::new(),
            snapshotter_root: None,
            remap_ids: true,
            remote_snapshot_annotations: false,
        }
    }
}

impl ContainerdOptions {
    /// A cached release series (`1.7`, `2`), no differ, no CRI.
    pub fn cached(series: &str) -> ContainerdOptions {
        Self::with_bin(ContainerdBin::Cached(series.to_string()))
    }

    /// These binaries, no differ, no CRI.
    pub fn with_bin(bin: ContainerdBin) -> ContainerdOptions {
        ContainerdOptions {
            bin,
            ..ContainerdOptions::default()
        }
    }

    /// With or without our differ.
    pub fn differ(mut self, with_differ: bool) -> ContainerdOptions {
        self.with_differ = with_differ;
        self
    }

    /// With the CRI plugin.
    pub fn cri(mut self, cri: CriOptions) -> ContainerdOptions {
        self.cri = Some(cri);
        self
    }
}

/// The daemon's `[differ]` section for a containerd started by [`Containerd::start_with`]
/// in `containerd_dir`: blobs are read from its content store, or through its socket.
pub fn differ_config(containerd_dir: &Path) -> String {
    differ_section(
        &containerd_dir.join("root/io.containerd.content.v1.content"),
        containerd_dir,
    )
}

/// The daemon's `[differ]` section: blobs read from `content_dir`, or through the socket
/// of the containerd started in `containerd_dir`.
pub(super) fn differ_section(content_dir: &Path, containerd_dir: &Path) -> String {
    format!(
        "\n[differ]\ncontent_dir = \"{}\"\ncontainerd_address = \"{}\"\n",
        content_dir.display(),
        containerd_dir.join("containerd.sock").display()
    )
}

/// Paths a containerd config names.
#[derive(Debug, Clone)]
pub struct ContainerdPaths {
    /// Working directory: root, state, opt, debug socket, hosts, CNI config.
    pub dir: PathBuf,
    /// containerd's gRPC socket.
    pub sock: PathBuf,
    /// Our daemon's socket (Snapshots, and Diff for `cas-diff`).
    pub snapshotter_sock: PathBuf,
}

/// Whether a config for `version` with `opts` declares `cas-diff`.
pub fn differ_declared(version: ContainerdVersion, opts: &ContainerdOptions) -> bool {
    opts.with_differ && version >= ContainerdVersion::PROXY_DIFFER
}

/// The config file for `version`: config version 2 up to 1.7, 3 from 2.0. containerd 1.6
/// never gets a `type = "diff"` entry (it panics at start on one).
pub fn containerd_config(
    version: ContainerdVersion,
    opts: &ContainerdOptions,
    paths: &ContainerdPaths,
) -> Result<String> {
    let d = paths.dir.display();
    let sock = paths.sock.display();
    let snap = paths.snapshotter_sock.display();
    let differ = differ_declared(version, opts);
    let v3 = version.config_v3();
    if opts.cri.is_some() && !v3 && version < ContainerdVersion::TRANSFER {
        bail!("the harness configures CRI for containerd 1.7 and 2.x only (this is {version})");
    }
    // Plugin names are quoted with ' in version 3 (as `containerd config default` writes
    // them) and " in version 2; both are TOML.
    let q = if v3 { '\'' } else { '"' };
    let plugin = |id: &str| format!("plugins.{q}{id}{q}");
    let mut disabled = vec!["io.containerd.nri.v1.nri"];
    if opts.cri.is_none() {
        disabled.extend([
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
            "io.containerd.podsandbox.controller.v1.podsandbox",
        ]);
    }
    let mut c = format!(
        r#"version = {cv}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[proxy_plugins]
  [proxy_plugins.cas]
    type = "snapshot"
    address = "{snap}"
{capabilities}{exports}"#,
        // 2.x: user-namespaced snapshots ride on ID-mapped clones of our layers
        capabilities = if v3 && opts.remap_ids {
            "    capabilities = [\"remap-ids\"]\n"
        } else {
            ""
        },
        exports = {
            let mut e = String::new();
            if let (Some(root), true) = (&opts.snapshotter_root, v3) {
                e += &format!("      root = \"{}\"\n", root.display());
            }
            if v3 && opts.remote_snapshot_annotations {
                e += "      enable_remote_snapshot_annotations = \"true\"\n";
            }
            if e.is_empty() {
                e
            } else {
                format!("    [proxy_plugins.cas.exports]\n{e}")
            }
        },
        cv = if v3 { 3 } else { 2 },
        disabled = disabled
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if differ {
        c += &format!(
            r#"  [proxy_plugins.cas-diff]
    type = "diff"
    address = "{snap}"
"#
        );
    }
    c += &format!(
        r#"[{opt}]
  path = "{d}/opt"
"#,
        opt = plugin("io.containerd.internal.v1.opt")
    );
    if differ {
        // Clients that unpack themselves (ctr --local, ctr on 1.7, CRI on 1.7) go through
        // the diff service, which tries each differ in turn and moves on when one answers
        // NotImplemented.
        c += &format!(
            "[{}]\n  default = [\"cas-diff\", \"walking\"]\n",
            plugin("io.containerd.service.v1.diff-service")
        );
    }
    if version >= ContainerdVersion::TRANSFER {
        // The transfer service (ctr pull and CRI on 2.x; `ctr pull --local=false` on 1.7)
        // unpacks with one differ per snapshotter and platform, and fails when it fails: no
        // fallback. Name a differ for every entry, because a proxy differ claims the host
        // platform and two matching differs are chosen between at random.
        let t = plugin("io.containerd.transfer.v1.local");
        c += &format!("[{t}]\n  config_path = \"{d}/certs.d\"\n");
        for (sn, df) in [
            ("cas", if differ { "cas-diff" } else { "walking" }),
            ("overlayfs", "walking"),
        ] {
            c += &format!(
                "  [[{t}.unpack_config]]\n    platform = \"linux\"\n    snapshotter = \"{sn}\"\n    differ = \"{df}\"\n"
            );
        }
    }
    if let (Some(cri), false) = (&opts.cri, v3) {
        // containerd 1.7: one CRI plugin, config version 2
        let p = plugin("io.containerd.grpc.v1.cri");
        c += &format!(
            r#"[{p}]
  sandbox_image = "{sandbox}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [{p}.containerd]
    snapshotter = "cas"
    # the layers' labels on Prepare, for partial pulls
    disable_snapshot_annotations = {disable}
    [{p}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{p}.containerd.runtimes.runc.options]
        Root = "{d}/runc"
{binary}  [{p}.cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  [{p}.registry]
    config_path = "{d}/certs.d"
"#,
            sandbox = cri.sandbox_image,
            disable = !opts.remote_snapshot_annotations,
            binary = match &cri.runc {
                Some(r) => format!("        BinaryName = \"{}\"\n", r.display()),
                None => String::new(),
            },
        );
    }
    if let (Some(cri), true) = (&opts.cri, v3) {
        let images = plugin("io.containerd.cri.v1.images");
        let runtime = plugin("io.containerd.cri.v1.runtime");
        let grpc = plugin("io.containerd.grpc.v1.cri");
        c += &format!(
            r#"[{images}]
  snapshotter = "cas"
  # seconds between CRI's passes over snapshot Usage (ImageFsInfo); 10 by default
  stats_collect_period = 1
  [{images}.pinned_images]
    sandbox = "{sandbox}"
  [{images}.registry]
    config_path = "{d}/certs.d"
[{runtime}]
  # Containers may not lower their oom_score_adj below containerd's: the sandbox asks for
  # -998, which needs CAP_SYS_RESOURCE, and test machines (containers) may lack it.
  restrict_oom_score_adj = true
  [{runtime}.cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/net.d"
  [{runtime}.containerd.runtimes.runc.options]
    Root = "{d}/runc"
{binary}
[{grpc}]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            sandbox = cri.sandbox_image,
            binary = match &cri.runc {
                Some(r) => format!("    BinaryName = \"{}\"\n", r.display()),
                None => String::new(),
            },
        );
    }
    Ok(c)
}

/// `hosts.toml` files under `dir/certs.d` that send pulls from these registries over
/// plain HTTP (the transfer service and CRI read them; `ctr --plain-http` does not need them).
pub(super) fn write_plain_http_hosts(dir: &Path, registries: &[String]) -> Result<()> {
    for r in registries {
        let d = dir.join("certs.d").join(r);
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> ContainerdVersion {
        ContainerdVersion {
            major,
            minor,
            patch,
        }
    }

    fn paths() -> ContainerdPaths {
        ContainerdPaths {
            dir: "/t/ctrd".into(),
            sock: "/t/ctrd/containerd.sock".into(),
            snapshotter_sock: "/t/cas.sock".into(),
        }
    }

    fn render(version: ContainerdVersion, opts: &ContainerdOptions) -> toml::Table {
        let text = containerd_config(version, opts, &paths()).unwrap();
        text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn versions_parse_from_containerd_output() {
        let debian17 =
            "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n";
        assert_eq!(ContainerdVersion::parse(debian17), Some(v(1, 7, 24)));
        let v2 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n";
        assert_eq!(ContainerdVersion::parse(v2), Some(v(2, 1, 9)));
        let upstream = "containerd github.com/containerd/containerd v1.6.20 2806fc1\n";
        assert_eq!(ContainerdVersion::parse(upstream), Some(v(1, 6, 20)));
        assert_eq!(ContainerdVersion::parse("nothing"), None);
    }

    #[test]
    fn containerd_binaries_from_a_word() {
        assert_eq!(ContainerdBin::from_arg("1.6"), ContainerdBin::System);
        assert_eq!(ContainerdBin::from_arg("system"), ContainerdBin::System);
        assert_eq!(
            ContainerdBin::from_arg("2"),
            ContainerdBin::Cached("2".into())
        );
        assert_eq!(
            ContainerdBin::from_arg("./build/bin"),
            ContainerdBin::Dir("./build/bin".into())
        );
        assert!(ContainerdBin::System.present());
    }

    #[test]
    fn containerd_1_6_never_gets_a_diff_entry() {
        let opts = ContainerdOptions::default().differ(true);
        let text = containerd_config(v(1, 6, 20), &opts, &paths()).unwrap();
        assert!(!text.contains("\"diff\""), "{text}");
        assert!(!text.contains("cas-diff"), "{text}");
        let c = render(v(1, 7, 3), &opts);
        assert!(c["proxy_plugins"].get("cas-diff").is_none());
        assert_eq!(c["version"].as_integer(), Some(2));
    }

    #[test]
    fn containerd_1_7_puts_our_differ_first() {
        let c = render(v(1, 7, 24), &ContainerdOptions::default().differ(true));
        assert_eq!(c["version"].as_integer(), Some(2));
        let diff = &c["proxy_plugins"]["cas-diff"];
        assert_eq!(diff["type"].as_str(), Some("diff"));
        assert_eq!(diff["address"].as_str(), Some("/t/cas.sock"));
        let order = &c["plugins"]["io.containerd.service.v1.diff-service"]["default"];
        assert_eq!(order.as_array().unwrap().len(), 2);
        assert_eq!(order[0].as_str(), Some("cas-diff"));
        assert_eq!(order[1].as_str(), Some("walking"));
        let unpack = &c["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"];
        assert_eq!(unpack[0]["differ"].as_str(), Some("cas-diff"));
        assert_eq!(unpack[1]["differ"].as_str(), Some("walking"));
        let c = render(v(1, 6, 20), &ContainerdOptions::default());
        assert!(c["plugins"]
            .get("io.containerd.transfer.v1.local")
            .is_none());
    }

    #[test]
    fn containerd_2_names_a_differ_for_every_unpack() {
        for with_differ in [true, false] {
            let c = render(
                v(2, 1, 9),
                &ContainerdOptions::default().differ(with_differ),
            );
            assert_eq!(c["version"].as_integer(), Some(3));
            assert_eq!(c["proxy_plugins"].get("cas-diff").is_some(), with_differ);
            let unpack = c["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
                .as_array()
                .unwrap();
            let pairs: Vec<(&str, &str)> = unpack
                .iter()
                .map(|u| {
                    (
                        u["snapshotter"].as_str().unwrap(),
                        u["differ"].as_str().unwrap(),
                    )
                })
                .collect();
            let ours = if with_differ { "cas-diff" } else { "walking" };
            assert_eq!(pairs, [("cas", ours), ("overlayfs", "walking")]);
            let disabled = c["disabled_plugins"].as_array().unwrap();
            assert!(disabled
                .iter()
                .any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri")));
        }
    }

    /// CRI (2.x) reports the exported root as the image filesystem's mountpoint.
    #[test]
    fn the_store_root_is_exported_on_2x() {
        let opts = ContainerdOptions {
            snapshotter_root: Some("/t/store".into()),
            ..ContainerdOptions::default()
        };
        let c = render(v(2, 1, 9), &opts);
        assert_eq!(
            c["proxy_plugins"]["cas"]["exports"]["root"].as_str(),
            Some("/t/store")
        );
        let caps = c["proxy_plugins"]["cas"]["capabilities"]
            .as_array()
            .unwrap();
        assert_eq!(caps[0].as_str(), Some("remap-ids"));
        let c = render(v(1, 7, 24), &opts);
        assert!(c["proxy_plugins"]["cas"].get("exports").is_none());
        assert!(c["proxy_plugins"]["cas"].get("capabilities").is_none());
    }

    #[test]
    fn cri_uses_our_snapshotter_and_sandbox_image() {
        let opts = ContainerdOptions::default().cri(CriOptions {
            sandbox_image: "127.0.0.1:5000/fixture/pause:1".into(),
            runc: Some("/c/runc".into()),
        });
        let c = render(v(2, 1, 9), &opts);
        let images = &c["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["snapshotter"].as_str(), Some("cas"));
        let runc = &c["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["options"]["BinaryName"].as_str(), Some("/c/runc"));
        assert_eq!(
            images["pinned_images"]["sandbox"].as_str(),
            Some("127.0.0.1:5000/fixture/pause:1")
        );
        let disabled = c["disabled_plugins"].as_array().unwrap();
        assert!(!disabled
            .iter()
            .any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri")));
        // 1.7: the one CRI plugin of config version 2; labels for partial pulls on request
        let c = render(v(1, 7, 24), &opts);
        let cri = &c["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("cas"));
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("127.0.0.1:5000/fixture/pause:1")
        );
        assert_eq!(
            cri["containerd"]["disable_snapshot_annotations"].as_bool(),
            Some(true)
        );
        let mut remote = opts.clone();
        remote.remote_snapshot_annotations = true;
        let c = render(v(1, 7, 24), &remote);
        assert_eq!(
            c["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["disable_snapshot_annotations"]
                .as_bool(),
            Some(false)
        );
        assert!(containerd_config(v(1, 6, 20), &opts, &paths()).is_err());
    }
}
