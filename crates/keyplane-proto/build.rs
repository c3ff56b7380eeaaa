//! Compiles `proto/keyplane/v1` with a vendored protoc, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // prost-build reads PROTOC; a build script is single-threaded, so setting it is sound.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", &protoc);
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["admin.proto", "agent.proto", "ops.proto", "resources.proto"]
        .map(|f| root.join("keyplane/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keyplane_descriptor.bin"))
        // Messages that carry a PIN get a redacting Debug, written in lib.rs.
        .skip_debug([
            ".keyplane.v1.Credential",
            ".keyplane.v1.DesiredSlot",
            ".keyplane.v1.ObservedSlot",
            // And the ones that carry a token, an enrollment code or a private key's
            // certificate request.
            ".keyplane.v1.IssueAgentTokenResponse",
            ".keyplane.v1.CreateDealerTokenResponse",
            ".keyplane.v1.EnrollmentCode",
            ".keyplane.v1.EnrollRequest",
        ])
        .compile_protos(&files, &[root, include])?;
    Ok(())
}
