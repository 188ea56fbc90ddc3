//! Compiles the client stubs of `leasehold.v1` from the workspace's shared
//! `proto/`, with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &["../../proto/leasehold/v1/leasehold.proto"],
            &["../../proto"],
        )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
