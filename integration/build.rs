//! Compiles the Kubernetes CRI API (`proto/cri/api.proto`, package `runtime.v1`) into a
//! gRPC client for the CRI end-to-end test, with the tonic the daemon already uses.

fn main() {
    println!("cargo:rerun-if-changed=proto/cri/api.proto");
    // The API's comments are Go-flavoured Markdown: rustdoc would read their indented
    // examples as doctests and their <placeholders> as HTML. The .proto has them.
    let mut prost = prost_build::Config::new();
    prost.disable_comments(["."]);
    tonic_build::configure()
        .build_server(false)
        .disable_comments(".")
        .compile_with_config(prost, &["proto/cri/api.proto"], &["proto/cri"])
        .expect("compiling proto/cri/api.proto (is protoc installed? make deps)");
}
