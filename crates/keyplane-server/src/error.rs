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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

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
