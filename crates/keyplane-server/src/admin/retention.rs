//! Retention of the dealer's events and audit records, and erasure of a person.

use super::*;

/// The retention policy singleton's name.
const NAME: &str = "retentionPolicy";

fn policy_pb(r: &store::Retention) -> pb::RetentionPolicy {
    let d = |d: std::time::Duration| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    };
    pb::RetentionPolicy {
        name: NAME.into(),
        event_retention: Some(d(r.events)),
        audit_retention: Some(d(r.audit)),
    }
}

fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name == NAME {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{field} must be {NAME:?} (the caller's dealer's retention policy); got {name:?}"
    )))
}

fn period(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    if d.nanos != 0 || d.seconds < 0 {
        return Err(Status::invalid_argument(format!(
            "{field} must be a whole, positive number of seconds (from 86400s, 1 day, to 100 years)"
        )));
    }
    Ok(Some(std::time::Duration::from_secs(
        d.seconds.unsigned_abs(),
    )))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetRetentionPolicyRequest>,
) -> Res<pb::RetentionPolicy> {
    let (actor, req) = dealer_call(request)?;
    check_name("name", &req.name)?;
    let r = api
        .store
        .retention_get(actor.dealer)
        .await
        .map_err(store_status)?;
    Ok(Response::new(policy_pb(&r)))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateRetentionPolicyRequest>,
) -> Res<pb::RetentionPolicy> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "changing the retention policy")?;
    let policy = required("retention_policy", req.retention_policy.as_ref())?;
    check_name("retention_policy.name", &policy.name)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("event_retention", policy.event_retention.is_some()),
            ("audit_retention", policy.audit_retention.is_some()),
        ],
    )?;
    let pick = |field: &str, value: Option<&prost_types::Duration>| {
        if !paths.iter().any(|p| p == field) {
            return Ok(None);
        }
        match period(&format!("retention_policy.{field}"), value)? {
            Some(d) => Ok(Some(d)),
            None => Err(Status::invalid_argument(format!(
                "retention_policy.{field} is named in update_mask but not set: give a period"
            ))),
        }
    };
    let events = pick("event_retention", policy.event_retention.as_ref())?;
    let audit = pick("audit_retention", policy.audit_retention.as_ref())?;
    let r = api
        .store
        .retention_update(&actor, events, audit)
        .await
        .map_err(store_status)?;
    Ok(Response::new(policy_pb(&r)))
}

pub(super) async fn erase_user(
    api: &AdminApi,
    request: Request<pb::EraseUserRequest>,
) -> Res<pb::EraseUserResponse> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, UserName::parse)?;
    let erased = api
        .store
        .user_erase(&actor, name.site, name.user)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Ok(Response::new(pb::EraseUserResponse {
        credentials_deleted: n(erased.credentials),
        events_redacted: n(erased.events),
        audit_records_redacted: n(erased.audit_records),
    }))
}
