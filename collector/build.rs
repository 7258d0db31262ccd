//! Generates the Jaeger remote-storage API (`proto/jaeger_storage_v2.proto`)
//! with tonic-prost-build, using the protoc binary and well-known types that
//! protoc-bin-vendored ships, so no system protoc is needed.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let proto = "proto/jaeger_storage_v2.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=proto/opentelemetry/proto/trace/v1/trace.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_server(true)
        // The tests query our server as Jaeger would.
        .build_client(true)
        // Span data is OTLP, from opentelemetry-proto: never redefined here.
        .extern_path(
            ".opentelemetry.proto.trace.v1",
            "::opentelemetry_proto::tonic::trace::v1",
        )
        .compile_with_config(
            config,
            &[proto],
            &[
                "proto",
                well_known
                    .to_str()
                    .ok_or("protoc include path is not UTF-8")?,
            ],
        )?;
    Ok(())
}
