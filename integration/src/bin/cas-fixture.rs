//! `cas-fixture`: build, push and compare fixture images from the command line.
//!
//! ```text
//! cas-fixture build --image base|app --busybox /bin/busybox --out DIR
//! cas-fixture push --layout DIR --registry 127.0.0.1:PORT --repo NAME --tag TAG
//! cas-fixture compare A B        # exit 1 when the trees differ
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use cas_integration::{fixture, registry, treecmp};
use clap::{Parser, Subcommand, ValueEnum};

/// Fixture images for cas-snapshotter's tests and demo.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Image {
    Base,
    App,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a fixture image as an OCI image layout.
    Build {
        #[arg(long, value_enum)]
        image: Image,
        /// A static busybox to put at /bin/busybox.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Push an OCI image layout to a registry over plain HTTP.
    Push {
        #[arg(long)]
        layout: PathBuf,
        #[arg(long)]
        registry: String,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        tag: String,
    },
    /// Compare two trees (content and metadata); exit 1 if they differ.
    Compare { a: PathBuf, b: PathBuf },
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.cmd {
        Cmd::Build {
            image,
            busybox,
            out,
        } => {
            let built = match image {
                Image::Base => fixture::build_base_image(&out, &busybox)?,
                Image::App => fixture::build_app_image(&out, &busybox)?,
            };
            println!(
                "{} ({} layers) in {}",
                built.manifest_digest,
                built.layer_digests.len(),
                out.display()
            );
        }
        Cmd::Push {
            layout,
            registry,
            repo,
            tag,
        } => {
            registry::push_layout(&layout, &registry, &repo, &tag)?;
            println!("pushed {registry}/{repo}:{tag}");
        }
        Cmd::Compare { a, b } => {
            let diffs = treecmp::compare_trees(&a, &b, &treecmp::CompareOptions::default())?;
            for d in &diffs {
                println!("{d}");
            }
            if !diffs.is_empty() {
                println!("{} differences", diffs.len());
                return Ok(ExitCode::from(1));
            }
            println!("identical");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cas-fixture: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
