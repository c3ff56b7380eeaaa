//! Personal access plans (seed 001): one per user, created with the user, never
//! deleted, only cleared.

use crate::authority::user_get_in_txn;
use crate::authority::{actor_resolve_in_txn, denied};
use crate::rules::schedule_from_json;
use crate::site::{
    audit_in_txn, etag_check, site_get_in_txn, site_lock_in_txn, user_slots_changed_in_txn,
};
use crate::{Actor, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use keyplane_core::DeviceKind;
use keyplane_core::personal;
use keyplane_core::schedule::Schedule;
use std::time::SystemTime;
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

async fn plan_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<PersonalPlan, StoreError> {
    let row = tx
        .query_opt(
            "SELECT configured, schedule, version, update_time FROM personal_access_plan
             WHERE site_id = $1 AND user_id = $2",
            &[&site, &user],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    let access_points = tx
        .query(
            "SELECT device_id FROM personal_access_point WHERE site_id = $1 AND user_id = $2 ORDER BY device_id",
            &[&site, &user],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(PersonalPlan {
        site,
        user,
        configured: row.get(0),
        access_points,
        schedule: schedule_from_json(row.get(1))?,
        version: row.get(2),
        update_time: row.get(3),
    })
}

async fn has_pin_in_txn(tx: &Transaction<'_>, site: Uuid, user: Uuid) -> Result<bool, StoreError> {
    Ok(tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM credential WHERE site_id = $1 AND user_id = $2)",
            &[&site, &user],
        )
        .await?
        .get(0))
}

fn refused(e: personal::PersonalPlanError) -> StoreError {
    StoreError::FailedPrecondition(e.to_string())
}

async fn plan_write_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
    access_points: &[Uuid],
    schedule: &Option<Schedule>,
) -> Result<(), StoreError> {
    let schedule = schedule
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    tx.execute(
        "UPDATE personal_access_plan SET configured = true, schedule = $3, version = version + 1, update_time = now()
         WHERE site_id = $1 AND user_id = $2",
        &[&site, &user, &schedule],
    )
    .await?;
    tx.execute(
        "DELETE FROM personal_access_point WHERE site_id = $1 AND user_id = $2",
        &[&site, &user],
    )
    .await?;
    tx.execute(
        "INSERT INTO personal_access_point (site_id, user_id, device_id) SELECT $1, $2, unnest($3::uuid[])",
        &[&site, &user, &access_points],
    )
    .await?;
    user_slots_changed_in_txn(tx, site, user, &["panel", "lock"]).await
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let target = user_get_in_txn(&tx, site, user).await?;
            let current = plan_get_in_txn(&tx, site, user).await?;
            let name = format!("sites/{site}/users/{user}/personalAccessPlan");
            etag_check(&format!("plan {name}"), etag, current.version)?;
            personal::check_configure(
                &format!("sites/{site}/users/{user}"),
                has_pin_in_txn(&tx, site, user).await?,
            )
            .map_err(refused)?;
            let devices = crate::device::device_list_for_site_in_txn(&tx, site).await?;
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
            let (who, acting) = actor_resolve_in_txn(&tx, actor, site).await?;
            let is_self = acting.is_some_and(|a| a.id == user);
            who.check_code_change(&target.authorities, &partitions, is_self)
                .map_err(denied)?;
            let schedule = patch
                .schedule
                .clone()
                .unwrap_or_else(|| current.schedule.clone());
            plan_write_in_txn(&tx, site, user, &access_points, &schedule).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "personal_plan.update",
                &name,
                serde_json::json!({ "access_points": access_points.len(), "scheduled": schedule.is_some() }),
            )
            .await?;
            plan_get_in_txn(&tx, site, user).await
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let target = user_get_in_txn(&tx, site, user).await?;
            let current = plan_get_in_txn(&tx, site, user).await?;
            let name = format!("sites/{site}/users/{user}/personalAccessPlan");
            etag_check(&format!("plan {name}"), etag, current.version)?;
            let (who, acting) = actor_resolve_in_txn(&tx, actor, site).await?;
            let is_self = acting.is_some_and(|a| a.id == user);
            let partitions: Vec<u8> = target.authorities.keys().copied().collect();
            who.check_code_change(&target.authorities, &partitions, is_self)
                .map_err(denied)?;
            personal::check_clear(
                &format!("sites/{site}/users/{user}"),
                current.configured,
                has_pin_in_txn(&tx, site, user).await?,
            )
            .map_err(refused)?;
            plan_write_in_txn(&tx, site, user, &[], &None).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "personal_plan.clear",
                &name,
                serde_json::json!({}),
            )
            .await?;
            plan_get_in_txn(&tx, site, user).await
        })
    }
}
