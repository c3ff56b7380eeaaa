//! Personal access plans (seed 001): one per user, created with the user, never
//! deleted, only cleared.

use crate::authority::{actor_from_loaded, denied, user_get_in_txn};
use crate::credential::{LoadRequest, Loaded, load_in_txn};
use crate::rules::schedule_from_json;
use crate::site::{AUDIT_FULL_SQL, etag_check, site_get_in_txn, user_slots_changed_sql};
use crate::{Actor, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use keyplane_core::DeviceKind;
use keyplane_core::personal;
use keyplane_core::schedule::Schedule;
use std::time::SystemTime;
use tokio_postgres::Client as Pg;
use tokio_postgres::Row;
use uuid::Uuid;

/// A personal access plan.
#[derive(Debug, Clone)]
pub struct PersonalPlan {
    /// Site id.
    pub site: Uuid,
    /// User id.
    pub user: Uuid,
    /// Whether it was ever configured (then it governs lock and panel access).
    pub configured: bool,
    /// Lock and panel device ids.
    pub access_points: Vec<Uuid>,
    /// When access is open; None: always.
    pub schedule: Option<Schedule>,
    /// Row version.
    pub version: i64,
    /// Last change.
    pub update_time: SystemTime,
}

/// Changes to a plan; `None` leaves a field as is.
#[derive(Debug, Clone, Default)]
pub struct PlanPatch {
    /// New access points.
    pub access_points: Option<Vec<Uuid>>,
    /// New schedule (`Some(None)`: always).
    pub schedule: Option<Option<Schedule>>,
}

/// A user's plan with its access points, as one row (site `$1`, user `$2`).
const PLAN_SQL: &str = "SELECT configured, schedule, version, update_time,
        ARRAY(SELECT device_id FROM personal_access_point pp
              WHERE pp.site_id = p.site_id AND pp.user_id = p.user_id ORDER BY device_id)
     FROM personal_access_plan p WHERE site_id = $1 AND user_id = $2";

/// Whether user `$2` of site `$1` holds a code.
const HAS_PIN_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM credential WHERE site_id = $1 AND user_id = $2)";

fn plan_from_row(site: Uuid, user: Uuid, row: &Row) -> Result<PersonalPlan, StoreError> {
    Ok(PersonalPlan {
        site,
        user,
        configured: row.get(0),
        access_points: row.get(4),
        schedule: schedule_from_json(row.get(1))?,
        version: row.get(2),
        update_time: row.get(3),
    })
}

async fn plan_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<PersonalPlan, StoreError> {
    let row = tx
        .query_opt(PLAN_SQL, &[&site, &user])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    plan_from_row(site, user, &row)
}

/// Locks the site and loads what a plan write decides on: the user, the plan and
/// whether the user holds a code, with the site's devices and partitions.
async fn plan_load_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
) -> Result<(Loaded, PersonalPlan, bool), StoreError> {
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&site, &user];
    let extra = [(PLAN_SQL, params), (HAS_PIN_SQL, params)];
    let loaded = load_in_txn(
        tx,
        actor,
        site,
        LoadRequest {
            user,
            user_row: true,
            extra: &extra,
            ..LoadRequest::default()
        },
    )
    .await?;
    if loaded.user_row.is_none() {
        return Err(StoreError::NotFound(format!(
            "user sites/{site}/users/{user}"
        )));
    }
    let plan = loaded.extra[0]
        .first()
        .map(|row| plan_from_row(site, user, row))
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    let has_pin = loaded.extra[1].first().is_some_and(|r| r.get(0));
    Ok((loaded, plan, has_pin))
}

fn refused(e: personal::PersonalPlanError) -> StoreError {
    StoreError::FailedPrecondition(e.to_string())
}

/// A personal access plan as the audit log records it before or after a change.
fn plan_audit_json(
    configured: bool,
    access_points: &[Uuid],
    schedule: Option<&Schedule>,
) -> serde_json::Value {
    let mut points = access_points.to_vec();
    points.sort_unstable();
    points.dedup();
    serde_json::json!({
        "configured": configured,
        "access_points": points,
        "schedule": schedule,
    })
}

/// Writes the plan, records its user's panel and lock slots as changed, audits (with
/// the plan as it was, `current`) and reads the plan back: one pipelined round trip.
#[allow(clippy::too_many_arguments)]
async fn plan_write_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
    access_points: &[Uuid],
    schedule: &Option<Schedule>,
    action: &str,
    detail: serde_json::Value,
    current: &PersonalPlan,
) -> Result<PersonalPlan, StoreError> {
    let before = Some(plan_audit_json(
        current.configured,
        &current.access_points,
        current.schedule.as_ref(),
    ));
    let after = Some(plan_audit_json(true, access_points, schedule.as_ref()));
    let schedule = schedule
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let name = format!("sites/{site}/users/{user}/personalAccessPlan");
    let changed_sql = user_slots_changed_sql();
    let (s_update, s_delete, s_insert, s_changed, s_audit, s_get) = tokio::try_join!(
        tx.prepare_cached(
            "UPDATE personal_access_plan SET configured = true, schedule = $3, version = version + 1, update_time = now()
             WHERE site_id = $1 AND user_id = $2"
        ),
        tx.prepare_cached("DELETE FROM personal_access_point WHERE site_id = $1 AND user_id = $2"),
        tx.prepare_cached(
            "INSERT INTO personal_access_point (site_id, user_id, device_id) SELECT $1, $2, unnest($3::uuid[])"
        ),
        tx.prepare_cached(&changed_sql),
        tx.prepare_cached(AUDIT_FULL_SQL),
        tx.prepare_cached(PLAN_SQL),
    )?;
    let kinds: &[&str] = &["panel", "lock"];
    let (updated, deleted, inserted, changed, audited, read) = tokio::join!(
        biased;
        async { Pg::execute(tx, &s_update, &[&site, &user, &schedule]).await },
        async { Pg::execute(tx, &s_delete, &[&site, &user]).await },
        async { Pg::execute(tx, &s_insert, &[&site, &user, &access_points]).await },
        async { Pg::execute(tx, &s_changed, &[&site, &user, &kinds]).await },
        async { Pg::execute(tx, &s_audit, &[&actor.dealer, &Some(site), &actor.principal, &action, &name, &actor.peer, &detail, &actor.acting_as, &actor.request_id, &before, &after]).await },
        async { Pg::query_one(tx, &s_get, &[&site, &user]).await },
    );
    updated?;
    deleted?;
    inserted?;
    changed?;
    audited?;
    plan_from_row(site, user, &read?)
}

impl Store {
    /// Reads a user's personal access plan.
    pub async fn personal_plan_get(
        &self,
        dealer: Uuid,
        site: Uuid,
        user: Uuid,
    ) -> Result<PersonalPlan, StoreError> {
        in_txn!(self, "personal_plan_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            user_get_in_txn(&tx, site, user).await?;
            plan_get_in_txn(&tx, site, user).await
        })
    }

    /// Configures a user's personal access plan.
    pub async fn personal_plan_update(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        patch: &PlanPatch,
        etag: &str,
    ) -> Result<PersonalPlan, StoreError> {
        in_txn!(self, "personal_plan_update", |tx| {
            let (loaded, current, has_pin) = plan_load_in_txn(&tx, actor, site, user).await?;
            let target = loaded.user(site, user)?;
            let name = format!("sites/{site}/users/{user}/personalAccessPlan");
            etag_check(&format!("plan {name}"), etag, current.version)?;
            personal::check_configure(&format!("sites/{site}/users/{user}"), has_pin)
                .map_err(refused)?;
            let devices = &loaded.devices;
            let perimeter: Vec<_> = devices.iter().filter(|d| d.perimeter).collect();
            if !perimeter.is_empty() && perimeter.iter().all(|d| d.kind() == DeviceKind::Door) {
                return Err(StoreError::FailedPrecondition(
                    "every perimeter entrance of this site is an access-control door: their standard access plans \
                     already limit when users reach the interior locks and the panel, so personal access plans are \
                     not used here"
                        .into(),
                ));
            }
            let access_points = patch
                .access_points
                .clone()
                .unwrap_or_else(|| current.access_points.clone());
            let mut partitions = Vec::new();
            for id in &access_points {
                let device = devices.iter().find(|d| d.id == *id).ok_or_else(|| {
                    StoreError::NotFound(format!("device sites/{site}/devices/{id}"))
                })?;
                if device.kind() == DeviceKind::Door {
                    return Err(StoreError::InvalidArgument(format!(
                        "access point {} is an access-control door: doors are scheduled by standard access plans",
                        device.name()
                    )));
                }
                partitions.extend(device.partition);
            }
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let is_self = acting.is_some_and(|a| a.id == user);
            who.check_code_change(&target.authorities, &partitions, is_self)
                .map_err(denied)?;
            let schedule = patch
                .schedule
                .clone()
                .unwrap_or_else(|| current.schedule.clone());
            let detail = serde_json::json!({ "access_points": access_points.len(), "scheduled": schedule.is_some() });
            plan_write_in_txn(
                &tx,
                actor,
                site,
                user,
                &access_points,
                &schedule,
                "personal_plan.update",
                detail,
                &current,
            )
            .await
        })
    }

    /// Clears a configured plan: it stays configured with no access points and no
    /// schedule, so it grants no lock or panel access.
    pub async fn personal_plan_clear(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        etag: &str,
    ) -> Result<PersonalPlan, StoreError> {
        in_txn!(self, "personal_plan_clear", |tx| {
            let (loaded, current, has_pin) = plan_load_in_txn(&tx, actor, site, user).await?;
            let target = loaded.user(site, user)?;
            let name = format!("sites/{site}/users/{user}/personalAccessPlan");
            etag_check(&format!("plan {name}"), etag, current.version)?;
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let is_self = acting.is_some_and(|a| a.id == user);
            let partitions: Vec<u8> = target.authorities.keys().copied().collect();
            who.check_code_change(&target.authorities, &partitions, is_self)
                .map_err(denied)?;
            personal::check_clear(
                &format!("sites/{site}/users/{user}"),
                current.configured,
                has_pin,
            )
            .map_err(refused)?;
            plan_write_in_txn(
                &tx,
                actor,
                site,
                user,
                &[],
                &None,
                "personal_plan.clear",
                serde_json::json!({}),
                &current,
            )
            .await
        })
    }
}
