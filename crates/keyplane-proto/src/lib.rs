//! Generated gRPC code for `keyplane.v1` and its encoded descriptor set (for reflection).
//! No logic lives here.

/// The `keyplane.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("keyplane.v1");
}

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyplane_descriptor");
