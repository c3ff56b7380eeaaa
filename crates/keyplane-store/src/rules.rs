//! Who may open what, when, at a site: personal plans, standard plans and holidays,
//! loaded for the desired state of codes (the agent's sync) and for finding the slots
//! a plan change touches. The rules themselves are `keyplane_core::access`.

use crate::{Cached, StoreError, Transaction};
use chrono::NaiveDate;
use keyplane_core::schedule::Schedule;
use tokio_postgres::Row;
use uuid::Uuid;

pub(crate) fn schedule_json(s: &Option<Schedule>) -> Result<Option<serde_json::Value>, StoreError> {
    s.as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| StoreError::Internal(e.to_string()))
}

pub(crate) fn schedule_from_json(
    value: Option<serde_json::Value>,
) -> Result<Option<Schedule>, StoreError> {
    value
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| StoreError::Internal(format!("stored schedule: {e}")))
}

pub(crate) use keyplane_core::access::AccessRules;

/// The reads of the access rules: holidays (site `$1` only), then the personal plans,
/// their access points and the standard plans (site `$1`) of users `$2` (NULL: every
/// user) and of the members of plan `$3`.
pub(crate) const RULES_SQL: [&str; 4] = [
    "SELECT day, plan_ids FROM holiday WHERE site_id = $1",
    "SELECT user_id, schedule FROM personal_access_plan
     WHERE site_id = $1 AND configured AND ($2::uuid[] IS NULL OR user_id = ANY($2)
        OR user_id IN (SELECT user_id FROM access_plan_member WHERE site_id = $1 AND plan_id = $3))",
    "SELECT user_id, device_id FROM personal_access_point
     WHERE site_id = $1 AND ($2::uuid[] IS NULL OR user_id = ANY($2)
        OR user_id IN (SELECT user_id FROM access_plan_member WHERE site_id = $1 AND plan_id = $3))",
    "SELECT p.id, p.schedule, m.user_id, d.device_id FROM access_plan p
     JOIN access_plan_member m ON m.site_id = p.site_id AND m.plan_id = p.id
     JOIN access_plan_device d ON d.site_id = p.site_id AND d.plan_id = p.id
     WHERE p.site_id = $1 AND ($2::uuid[] IS NULL OR m.user_id = ANY($2)
        OR m.user_id IN (SELECT user_id FROM access_plan_member WHERE site_id = $1 AND plan_id = $3))",
];

/// The site's access rules as they apply to `users` (None: every user): an agent's
/// catch-up reads the rules of the users whose codes changed, not the whole site's.
pub(crate) async fn access_rules_for_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    users: Option<&[Uuid]>,
) -> Result<AccessRules, StoreError> {
    // Independent reads, pipelined: one round trip.
    let plan: Option<Uuid> = None;
    let by_site: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&site];
    let by_users: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&site, &users, &plan];
    let (holidays, personal, points, standard) = tokio::join!(
        tx.query(RULES_SQL[0], by_site),
        tx.query(RULES_SQL[1], by_users),
        tx.query(RULES_SQL[2], by_users),
        tx.query(RULES_SQL[3], by_users),
    );
    rules_from_rows(&holidays?, &personal?, &points?, &standard?)
}

/// Access rules from the rows of [`RULES_SQL`], in its order.
pub(crate) fn rules_from_rows(
    holidays: &[Row],
    personal: &[Row],
    points: &[Row],
    standard: &[Row],
) -> Result<AccessRules, StoreError> {
    rules_from_parts(&holidays_from_rows(holidays), personal, points, standard)
}

/// Holidays (day, plans paused) from rows of `RULES_SQL[0]`.
pub(crate) fn holidays_from_rows(rows: &[Row]) -> Vec<(NaiveDate, Vec<Uuid>)> {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Access rules from decided holidays and the rows of the other reads of
/// [`RULES_SQL`], so the rules after a holiday change are known without reading again.
pub(crate) fn rules_from_parts(
    holidays: &[(NaiveDate, Vec<Uuid>)],
    personal: &[Row],
    points: &[Row],
    standard: &[Row],
) -> Result<AccessRules, StoreError> {
    let personal = personal
        .iter()
        .map(|r| Ok((r.get(0), schedule_from_json(r.get(1))?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let points = points.iter().map(|r| (r.get(0), r.get(1)));
    let standard = standard
        .iter()
        .map(|r| Ok((r.get(0), schedule_from_json(r.get(1))?, r.get(2), r.get(3))))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(AccessRules::new(holidays, personal, points, standard))
}
