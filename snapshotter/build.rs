//! Generates the Diff server and the Content client from the vendored containerd protos
//! (see `proto/README.md`) with the tonic that `containerd-snapshots` is built on.

const PROTOS: &[&str] = &[
    "proto/github.com/containerd/containerd/api/services/diff/v1/diff.proto",
    "proto/github.com/containerd/containerd/api/services/content/v1/content.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    // The protos' comments hold Go-flavoured snippets rustdoc would take for Rust code
    // and doctests; the .proto files have them.
    let mut prost = prost_build::Config::new();
    prost.disable_comments(["."]);
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .disable_comments(".")
        // One Mount type on our socket: the one the Snapshots service already uses.
        .extern_path(
            ".containerd.types.Mount",
            "::containerd_snapshots::api::types::Mount",
        )
        .compile_with_config(prost, PROTOS, &["proto"])?;
    Ok(())
}
