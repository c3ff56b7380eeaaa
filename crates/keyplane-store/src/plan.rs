//! Personal access plans (seed 001): one per user, created with the user, never
//! deleted, only cleared.

use crate::access_plan::schedule_from_json;
use crate::authority::{actor_resolve_in_txn, denied};
use crate::site::{
    audit_in_txn, etag_check, site_get_in_txn, site_lock_in_txn, user_slots_changed_in_txn,
};
use crate::user::user_get_in_txn;
use crate::{Actor, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use chrono::NaiveDate;
use keyplane_core::DeviceKind;
use keyplane_core::personal;
use keyplane_core::schedule::{DAY_MINUTES, Schedule, Window};
use std::collections::{BTreeSet, HashMap};
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

pub(crate) async fn plan_create_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO personal_access_plan (site_id, user_id) VALUES ($1, $2)",
        &[&site, &user],
    )
    .await?;
    Ok(())
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

/// Who may open what, when, at a site: personal plans (locks and panels), standard
/// plans (doors and locks) and holidays.
#[derive(Debug, Default)]
pub(crate) struct AccessRules {
    /// Configured personal plans: user -> (access points, schedule).
    personal: HashMap<Uuid, (BTreeSet<Uuid>, Option<Schedule>)>,
    /// Standard plans: (user, device) -> the schedules of plans granting it.
    standard: HashMap<(Uuid, Uuid), Vec<Option<Schedule>>>,
}

/// Applies holidays: a paused plan that had no schedule becomes 24/7 but for them.
fn paused(schedule: Option<Schedule>, days: &[NaiveDate]) -> Option<Schedule> {
    if days.is_empty() {
        return schedule;
    }
    let mut s = schedule.unwrap_or_else(|| Schedule {
        windows: vec![Window {
            days: 0x7f,
            start: 0,
            end: DAY_MINUTES,
        }],
        ..Schedule::default()
    });
    s.paused_dates.extend_from_slice(days);
    Some(s)
}

impl AccessRules {
    /// The schedules under which `user`'s code belongs on `device`: None always, an
    /// empty list never. A configured personal plan governs locks and panels; other
    /// devices follow the standard plans granting them, if any.
    pub(crate) fn schedules_for(
        &self,
        user: Uuid,
        device: Uuid,
        kind: Option<&str>,
    ) -> Option<Vec<Schedule>> {
        if let (Some("panel" | "lock"), Some((points, schedule))) = (kind, self.personal.get(&user))
        {
            return Some(if points.contains(&device) {
                match schedule {
                    None => return None,
                    Some(s) => vec![s.clone()],
                }
            } else {
                Vec::new()
            });
        }
        let plans = self.standard.get(&(user, device))?;
        if plans.iter().any(Option::is_none) {
            return None;
        }
        Some(plans.iter().flatten().cloned().collect())
    }
}

/// The site's access rules, for every user.
pub(crate) async fn access_rules_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
) -> Result<AccessRules, StoreError> {
    access_rules_for_in_txn(tx, site, None).await
}

/// The site's access rules as they apply to `users` (None: every user): an agent's
/// catch-up reads the rules of the users whose codes changed, not the whole site's.
pub(crate) async fn access_rules_for_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    users: Option<&[Uuid]>,
) -> Result<AccessRules, StoreError> {
    let holidays: Vec<(NaiveDate, Vec<Uuid>)> = tx
        .query(
            "SELECT day, plan_ids FROM holiday WHERE site_id = $1",
            &[&site],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let days_for = |plan: Option<Uuid>| -> Vec<NaiveDate> {
        holidays
            .iter()
            .filter(|(_, plans)| plans.is_empty() || plan.is_some_and(|p| plans.contains(&p)))
            .map(|(d, _)| *d)
            .collect()
    };
    let mut rules = AccessRules::default();
    for row in tx
        .query(
            "SELECT user_id, schedule FROM personal_access_plan
             WHERE site_id = $1 AND configured AND ($2::uuid[] IS NULL OR user_id = ANY($2))",
            &[&site, &users],
        )
        .await?
    {
        let schedule = paused(schedule_from_json(row.get(1))?, &days_for(None));
        rules
            .personal
            .insert(row.get::<_, Uuid>(0), (BTreeSet::new(), schedule));
    }
    for row in tx
        .query(
            "SELECT user_id, device_id FROM personal_access_point
             WHERE site_id = $1 AND ($2::uuid[] IS NULL OR user_id = ANY($2))",
            &[&site, &users],
        )
        .await?
    {
        if let Some((points, _)) = rules.personal.get_mut(&row.get::<_, Uuid>(0)) {
            points.insert(row.get(1));
        }
    }
    for row in tx
        .query(
            "SELECT p.id, p.schedule, m.user_id, d.device_id FROM access_plan p
             JOIN access_plan_member m ON m.site_id = p.site_id AND m.plan_id = p.id
             JOIN access_plan_device d ON d.site_id = p.site_id AND d.plan_id = p.id
             WHERE p.site_id = $1 AND ($2::uuid[] IS NULL OR m.user_id = ANY($2))",
            &[&site, &users],
        )
        .await?
    {
        let schedule = paused(schedule_from_json(row.get(1))?, &days_for(Some(row.get(0))));
        rules
            .standard
            .entry((row.get(2), row.get(3)))
            .or_default()
            .push(schedule);
    }
    Ok(rules)
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
