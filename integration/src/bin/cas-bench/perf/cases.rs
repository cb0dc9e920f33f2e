//! The cases `make bench` runs, each for both snapshotters: what is pulled, what is
//! set up before (content fetched, a base unpacked), and at which sizes.

use crate::images::{scaling_image, Sizes};

/// One benchmark case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short name (CSV, plots).
    pub id: String,
    /// What it measures.
    pub title: String,
    /// Images unpacked with the same snapshotter before the timed step.
    pub(super) setup: Vec<String>,
    /// Images pulled in the timed step (at once when several).
    pub(super) targets: Vec<String>,
    /// Whether the content is absent before the timed step (download included).
    pub(super) cold: bool,
    /// Files of a scaling case.
    pub scaling_files: Option<u64>,
}

/// The Debian images the real-image cases pull, as `scripts/bench-dedup.sh` names them.
pub(super) const DEBIAN_IMAGES: [&str; 5] =
    ["base-1", "base-2", "app-1", "base-1-zstd", "app-1-zstd"];

/// The cases on the Debian images (debootstrap bases, an apt-get layer), those whose
/// images `have` holds (`debian-<name>`).
pub(super) fn debian_cases(have: &dyn Fn(&str) -> bool) -> Vec<Case> {
    let c = |id: &str, title: &str, setup: &[&str], targets: &[&str]| Case {
        id: id.into(),
        title: title.into(),
        setup: setup.iter().map(|s| format!("debian-{s}")).collect(),
        targets: targets.iter().map(|s| format!("debian-{s}")).collect(),
        cold: false,
        scaling_files: None,
    };
    [
        c(
            "debian-unpack",
            "Debian base (debootstrap minbase), gzip",
            &[],
            &["base-1"],
        ),
        c(
            "debian-unpack-zstd",
            "the same Debian base, zstd",
            &[],
            &["base-1-zstd"],
        ),
        c(
            "debian-near-dup",
            "another build of the Debian base, one present",
            &["base-1"],
            &["base-2"],
        ),
        c(
            "debian-app",
            "an apt-get install layer over the present Debian base, gzip",
            &["base-1"],
            &["app-1"],
        ),
        c(
            "debian-app-zstd",
            "the same app layer over the zstd base, zstd",
            &["base-1-zstd"],
            &["app-1-zstd"],
        ),
    ]
    .into_iter()
    .filter(|case| case.setup.iter().chain(&case.targets).all(|i| have(i)))
    .collect()
}

pub(super) fn cases(sizes: Sizes) -> Vec<Case> {
    let c = |id: &str, title: &str, setup: &[&str], targets: &[&str], cold: bool| Case {
        id: id.into(),
        title: title.into(),
        setup: setup.iter().map(|s| s.to_string()).collect(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
        cold,
        scaling_files: None,
    };
    let mut v = vec![
        c(
            "unpack",
            "unpack only (content present), base image, gzip",
            &[],
            &["base-1"],
            false,
        ),
        c(
            "unpack-zstd",
            "unpack only, the same base image, zstd",
            &[],
            &["base-1-zstd"],
            false,
        ),
        c(
            "cold-pull",
            "cold pull (fetch + unpack) of the base image",
            &[],
            &["base-1"],
            true,
        ),
        c(
            "near-dup",
            "unpack a near-duplicate base (another build of it present)",
            &["base-1"],
            &["base-2"],
            false,
        ),
        c(
            "large-files",
            "unpack one layer of large files",
            &[],
            &["large"],
            false,
        ),
        c(
            "small-files",
            "unpack one layer of small files",
            &[],
            &["small"],
            false,
        ),
        c(
            "app-on-base",
            "unpack an app layer over a present base",
            &["base-1"],
            &["app"],
            false,
        ),
        c(
            "4-pulls",
            "four cold pulls at once (near-duplicate bases)",
            &[],
            &["base-1", "base-2", "base-3", "base-4"],
            true,
        ),
    ];
    v[4].title = format!("{} ({})", v[4].title, "see sizes below");
    v[5].title = format!("unpack one layer of {} small files", sizes.small_files());
    for n in sizes.scaling() {
        let img = scaling_image(n);
        let mut case = c(
            &format!("scale-{n}"),
            &format!("unpack a layer of {n} files"),
            &[],
            &[&img],
            false,
        );
        case.scaling_files = Some(n);
        v.push(case);
    }
    v
}
