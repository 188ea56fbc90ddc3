//! With the `grpc` feature, compiles the fenced key-value service's contract
//! from the workspace's shared `proto/`, with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        // prost-build finds protoc through this variable.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
        tonic_prost_build::configure().compile_protos(
            &["../../proto/leasehold/v1/fenced_kv.proto"],
            &["../../proto"],
        )?;
        println!("cargo:rerun-if-changed=../../proto");
    }
    Ok(())
}
