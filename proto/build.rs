//! Compiles `trainyard/v1/*.proto` with `protox` (pure Rust, no `protoc`
//! needed) and generates prost messages plus tonic client and server code.
//! The encoded descriptor set is written beside the code for gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "trainyard/v1/job.proto",
        "trainyard/v1/tasks.proto",
        "trainyard/v1/service.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("trainyard_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Keeps StageResult small: only OOM retries carry settings.
        .boxed(".trainyard.v1.TrainingAdjusted.training")
        .compile_fds(fds)?;
    Ok(())
}
