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

/// The four reads of the access rules, in the order [`rules_from_rows`] takes them:
/// holidays (site `$1` only), then the personal plans, their access points and the
/// standard plans of site `$1`, each limited to the users `$users!(column)` appends a
/// condition for (`""`: every user).
macro_rules! rules_sql {
    ($users:ident) => {
        [
            "SELECT day, plan_ids FROM holiday WHERE site_id = $1",
            concat!(
                "SELECT user_id, schedule FROM personal_access_plan WHERE site_id = $1 AND configured",
                $users!("user_id")
            ),
            concat!(
                "SELECT user_id, device_id FROM personal_access_point WHERE site_id = $1",
                $users!("user_id")
            ),
            concat!(
                "SELECT p.id, p.schedule, m.user_id, d.device_id FROM access_plan p
                 JOIN access_plan_member m ON m.site_id = p.site_id AND m.plan_id = p.id
                 JOIN access_plan_device d ON d.site_id = p.site_id AND d.plan_id = p.id
                 WHERE p.site_id = $1",
                $users!("m.user_id")
            ),
        ]
    };
}
pub(crate) use rules_sql;

/// Users `$2` (NULL: every user) and the members of plan `$3`.
macro_rules! users_or_plan_members {
    ($column:literal) => {
        concat!(
            " AND ($2::uuid[] IS NULL OR ",
            $column,
            " = ANY($2) OR ",
            $column,
            " IN (SELECT user_id FROM access_plan_member WHERE site_id = $1 AND plan_id = $3))"
        )
    };
}

/// The reads of the access rules (see [`rules_sql`]) of users `$2` (NULL: every
/// user) and of the members of plan `$3`.
pub(crate) const RULES_SQL: [&str; 4] = rules_sql!(users_or_plan_members);

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
