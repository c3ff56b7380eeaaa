//! The one place where errors become gRPC statuses. Internal detail (SQL, keys) is
//! logged here and never sent to clients.

use keyplane_core::names::NameError;
use keyplane_core::pin::PinError;
use keyplane_store::StoreError;
use tonic::Status;

/// Maps a store error to a status a person can act on.
pub fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::AlreadyExists(msg) => Status::already_exists(msg),
        StoreError::InvalidArgument(msg) => Status::invalid_argument(msg),
        StoreError::FailedPrecondition(msg) => Status::failed_precondition(msg),
        StoreError::ResourceExhausted(msg) => Status::resource_exhausted(msg),
        StoreError::Aborted(msg) => Status::aborted(msg),
        StoreError::PermissionDenied(msg) => Status::permission_denied(msg),
        StoreError::Pool(detail) => {
            tracing::error!(%detail, "database pool unavailable");
            Status::unavailable("the database is unavailable; retry shortly")
        }
        StoreError::Unavailable(detail) => {
            tracing::warn!(%detail, "database connection lost");
            Status::unavailable(
                "the database connection was lost (restart or failover): retry shortly (a create with the same request_id is not applied twice)",
            )
        }
        StoreError::Db(e) => {
            // tokio-postgres prints only "db error"; the server's own words are in
            // the source (never a PIN: PINs are bound as sealed bytes, not text).
            let detail = e
                .as_db_error()
                .map(|d| {
                    format!(
                        "{}: {} ({})",
                        d.code().code(),
                        d.message(),
                        d.detail().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| e.to_string());
            tracing::error!(error = %detail, "internal error: database");
            Status::internal("internal error; the server logged the details")
        }
        err @ StoreError::Internal(_) => {
            tracing::error!(error = %err, "internal error");
            Status::internal("internal error; the server logged the details")
        }
    }
}

/// An authority refusal decided before the store is reached.
pub fn authority_status(err: keyplane_core::authority::AuthorityError) -> Status {
    if err.is_precondition() {
        Status::failed_precondition(err.to_string())
    } else {
        Status::permission_denied(err.to_string())
    }
}

/// A malformed resource name in field `field`.
pub fn name_status(field: &str, err: NameError) -> Status {
    Status::invalid_argument(format!("{field}: {err}"))
}

/// A refused PIN in field `field`.
pub fn pin_status(field: &str, err: PinError) -> Status {
    Status::invalid_argument(format!("{field}: {err}"))
}

/// The prefix of tonic's status for a request its protobuf decoder refused.
const DECODE_FAILURE: &str = "failed to decode Protobuf message";

/// A request that is not a valid message is the caller's error, not the server's:
/// tonic reports it as INTERNAL, this makes it INVALID_ARGUMENT (keeping prost's
/// words, which name the field but never its value). Other statuses pass as they are.
pub fn undecodable_is_invalid(status: Status) -> Status {
    if status.code() == tonic::Code::Internal && status.message().starts_with(DECODE_FAILURE) {
        let detail = status.message()[DECODE_FAILURE.len()..].trim_start_matches([':', ' ']);
        Status::invalid_argument(format!(
            "the message is not a valid keyplane.v1 message ({detail}): check that the client was generated from this API's proto files"
        ))
    } else {
        status
    }
}

/// [`undecodable_is_invalid`] for a unary response already rendered to HTTP (the
/// status of a refused decode travels in its headers).
pub fn undecodable_response_is_invalid(
    response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() == tonic::Code::Internal => {
            let mapped = undecodable_is_invalid(status);
            if mapped.code() == tonic::Code::Internal {
                response
            } else {
                mapped.into_http()
            }
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn only_a_refused_decode_becomes_invalid_argument() {
        let cases = [
            (
                Status::internal(
                    "failed to decode Protobuf message: Hello.site: invalid string value: data is not UTF-8 encoded",
                ),
                Code::InvalidArgument,
                "(Hello.site: invalid string value: data is not UTF-8 encoded)",
            ),
            (
                Status::internal("internal error; the server logged the details"),
                Code::Internal,
                "internal error",
            ),
            (
                Status::not_found("failed to decode Protobuf message"),
                Code::NotFound,
                "failed to decode",
            ),
        ];
        for (status, code, words) in cases {
            let mapped = undecodable_is_invalid(status);
            assert_eq!(mapped.code(), code, "{}", mapped.message());
            assert!(mapped.message().contains(words), "{}", mapped.message());
        }
    }

    #[test]
    fn store_errors_map_to_precise_codes() {
        let cases = [
            (StoreError::NotFound("site sites/x".into()), Code::NotFound),
            (StoreError::AlreadyExists("dup".into()), Code::AlreadyExists),
            (
                StoreError::InvalidArgument("bad".into()),
                Code::InvalidArgument,
            ),
            (
                StoreError::FailedPrecondition("no".into()),
                Code::FailedPrecondition,
            ),
            (
                StoreError::ResourceExhausted("full".into()),
                Code::ResourceExhausted,
            ),
            (StoreError::Aborted("etag".into()), Code::Aborted),
            (
                StoreError::PermissionDenied("level".into()),
                Code::PermissionDenied,
            ),
            (StoreError::Pool("down".into()), Code::Unavailable),
            (StoreError::Unavailable("gone".into()), Code::Unavailable),
            (StoreError::Internal("secret detail".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = store_status(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
    }
}
