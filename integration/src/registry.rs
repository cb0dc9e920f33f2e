//! Pushing an OCI image layout to a registry (Distribution API v2, plain HTTP).
//!
//! Blobs go up with a monolithic upload (`POST …/blobs/uploads/` then `PUT <location>
//! ?digest=…`), skipped when the registry already has them (`HEAD`), then the manifest
//! is put under its tag.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

fn check(
    resp: std::result::Result<ureq::Response, ureq::Error>,
    what: &str,
) -> Result<ureq::Response> {
    match resp {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            bail!("{what}: HTTP {code}: {body}")
        }
        Err(e) => Err(e).context(what.to_string()),
    }
}

/// Pushes the single image of `layout_dir` to `registry` (`127.0.0.1:PORT`) as
/// `repo:tag`.
pub fn push_layout(layout_dir: &Path, registry: &str, repo: &str, tag: &str) -> Result<()> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout_dir.join("index.json"))?)?;
    let desc = &index["manifests"][0];
    let mdigest = desc["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let blob = |d: &str| {
        layout_dir
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest_bytes = fs::read(blob(mdigest))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)?;
    let base = format!("http://{registry}/v2/{repo}");
    let mut digests = vec![manifest["config"]["digest"]
        .as_str()
        .context("no config")?
        .to_string()];
    for l in manifest["layers"].as_array().context("no layers")? {
        digests.push(
            l["digest"]
                .as_str()
                .context("layer without digest")?
                .to_string(),
        );
    }
    for d in digests {
        if ureq::head(&format!("{base}/blobs/{d}")).call().is_ok() {
            continue;
        }
        let r = check(
            ureq::post(&format!("{base}/blobs/uploads/")).call(),
            "starting upload",
        )?;
        let loc = r
            .header("Location")
            .context("upload without Location")?
            .to_string();
        let loc = if loc.starts_with('/') {
            format!("http://{registry}{loc}")
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let bytes = fs::read(blob(&d)).with_context(|| format!("reading blob {d}"))?;
        check(
            ureq::put(&format!("{loc}{sep}digest={d}"))
                .set("Content-Type", "application/octet-stream")
                .send_bytes(&bytes),
            &format!("uploading {d}"),
        )?;
    }
    let media = manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    check(
        ureq::put(&format!("{base}/manifests/{tag}"))
            .set("Content-Type", media)
            .send_bytes(&manifest_bytes),
        "putting the manifest",
    )?;
    Ok(())
}
