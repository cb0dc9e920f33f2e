//! Compiles the Kubernetes CRI API (`proto/cri/api.proto`, package `runtime.v1`) into a
//! gRPC client for the CRI end-to-end test, with the tonic the daemon already uses.

fn main() {
    println!("cargo:rerun-if-changed=proto/cri/api.proto");
    tonic_build::configure()
        .build_server(false)
        .compile(&["proto/cri/api.proto"], &["proto/cri"])
        .expect("compiling proto/cri/api.proto (is protoc installed? make deps)");
}
