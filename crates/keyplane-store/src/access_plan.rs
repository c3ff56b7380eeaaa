//! Standard access plans (doors shared by many users), holidays and lockdown.

use crate::rules::{
    AccessRules, access_rules_for_in_txn, access_rules_in_txn, schedule_from_json, schedule_json,
};
use crate::site::{
    audit_in_txn, etag_check, replayed_id, request_remember_in_txn, request_replay_in_txn,
    site_change_record_in_txn, site_get_in_txn, site_lock_in_txn,
};
use crate::{Actor, PageRequest, RequestKey, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use chrono::NaiveDate;
use keyplane_core::DeviceKind;
use keyplane_core::schedule::Schedule;
use std::time::SystemTime;
use tokio_postgres::Row;
use uuid::Uuid;

/// A standard access plan.
#[derive(Debug, Clone)]
pub struct AccessPlan {
    /// Site id.
    pub site: Uuid,
    /// Plan id.
    pub id: Uuid,
    /// Display name.
    pub display_name: String,
    /// Doors (and locks) it opens.
    pub devices: Vec<Uuid>,
    /// Users it applies to.
    pub members: Vec<Uuid>,
    /// When; None: always.
    pub schedule: Option<Schedule>,
    /// Row version.
    pub version: i64,
    /// Last change.
    pub update_time: SystemTime,
}

/// Fields of a plan to create or replace.
#[derive(Debug, Clone, Default)]
pub struct AccessPlanFields {
    /// Display name.
    pub display_name: Option<String>,
    /// Doors (and locks).
    pub devices: Option<Vec<Uuid>>,
    /// Users.
    pub members: Option<Vec<Uuid>>,
    /// Schedule (`Some(None)`: always).
    pub schedule: Option<Option<Schedule>>,
}

/// A site holiday.
#[derive(Debug, Clone)]
pub struct Holiday {
    /// Site id.
    pub site: Uuid,
    /// Local date.
    pub day: NaiveDate,
    /// Display name.
    pub display_name: String,
    /// Standard plans paused; empty: every plan, personal ones included.
    pub plans: Vec<Uuid>,
}

/// Records a change of every slot whose schedules differ from what `before` (the
/// site's access rules before this transaction's writes) gave it: a rename or a plan
/// whose members hold no codes changes nothing an agent must hear of.
/// With `users`, only their codes are compared (`before` must hold their rules): a
/// standard plan's change touches its members' codes only, however large the site.
pub(crate) async fn access_rules_changed_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    before: &AccessRules,
    users: Option<&[Uuid]>,
) -> Result<(), StoreError> {
    let after = access_rules_for_in_txn(tx, site, users).await?;
    let mut changed = Vec::new();
    for r in tx
        .query(
            "SELECT sa.device_id, sa.slot, c.user_id, d.kind FROM slot_assignment sa
             JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
             JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             WHERE sa.site_id = $1 AND ($2::uuid[] IS NULL OR c.user_id = ANY($2))",
            &[&site, &users],
        )
        .await?
    {
        let (device, slot) = crate::site::device_slot(&r);
        let user: Uuid = r.get(2);
        let kind: Option<&str> = r.get(3);
        if before.schedules_for(user, device, kind) != after.schedules_for(user, device, kind) {
            changed.push((device, slot));
        }
    }
    if !changed.is_empty() {
        site_change_record_in_txn(tx, site, &changed).await?;
    }
    Ok(())
}

/// A whole plan from `access_plan p`: its row, devices and members, so a page of
/// plans is one query.
const ACCESS_PLAN_FIELDS: &str = "p.id, p.display_name, p.schedule, p.version, p.update_time,
    ARRAY(SELECT device_id FROM access_plan_device d
          WHERE d.site_id = p.site_id AND d.plan_id = p.id ORDER BY device_id),
    ARRAY(SELECT user_id FROM access_plan_member m
          WHERE m.site_id = p.site_id AND m.plan_id = p.id ORDER BY user_id)";

fn access_plan_from_row(site: Uuid, row: &Row) -> Result<AccessPlan, StoreError> {
    Ok(AccessPlan {
        site,
        id: row.get(0),
        display_name: row.get(1),
        schedule: schedule_from_json(row.get(2))?,
        version: row.get(3),
        update_time: row.get(4),
        devices: row.get(5),
        members: row.get(6),
    })
}

async fn access_plan_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    id: Uuid,
) -> Result<AccessPlan, StoreError> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {ACCESS_PLAN_FIELDS} FROM access_plan p WHERE p.site_id = $1 AND p.id = $2"
            ),
            &[&site, &id],
        )
        .await?
        .ok_or_else(|| {
            StoreError::NotFound(format!("access plan sites/{site}/accessPlans/{id}"))
        })?;
    access_plan_from_row(site, &row)
}

async fn access_plan_write_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    id: Uuid,
    fields: &AccessPlanFields,
    before: &AccessRules,
    users: &[Uuid],
) -> Result<(), StoreError> {
    if let Some(devices) = &fields.devices {
        for d in devices {
            let device = crate::device::device_get_in_txn(tx, site, *d).await?;
            if !matches!(device.kind(), DeviceKind::Door | DeviceKind::Lock) {
                return Err(StoreError::InvalidArgument(format!(
                    "device {} is a panel: standard access plans schedule doors (and locks); the panel follows personal access plans",
                    device.name()
                )));
            }
        }
        tx.execute(
            "DELETE FROM access_plan_device WHERE site_id = $1 AND plan_id = $2",
            &[&site, &id],
        )
        .await?;
        tx.execute(
            "INSERT INTO access_plan_device (site_id, plan_id, device_id) SELECT $1, $2, unnest($3::uuid[])",
            &[&site, &id, devices],
        )
        .await?;
    }
    if let Some(members) = &fields.members {
        for u in members {
            crate::authority::user_get_in_txn(tx, site, *u).await?;
        }
        tx.execute(
            "DELETE FROM access_plan_member WHERE site_id = $1 AND plan_id = $2",
            &[&site, &id],
        )
        .await?;
        tx.execute(
            "INSERT INTO access_plan_member (site_id, plan_id, user_id) SELECT $1, $2, unnest($3::uuid[])",
            &[&site, &id, members],
        )
        .await?;
    }
    let schedule = match &fields.schedule {
        Some(s) => Some(schedule_json(s)?),
        None => None,
    };
    tx.execute(
        "UPDATE access_plan SET display_name = COALESCE($3, display_name),
            schedule = CASE WHEN $4 THEN $5 ELSE schedule END,
            version = version + 1, update_time = now()
         WHERE site_id = $1 AND id = $2",
        &[
            &site,
            &id,
            &fields.display_name,
            &schedule.is_some(),
            &schedule.flatten(),
        ],
    )
    .await?;
    access_rules_changed_in_txn(tx, site, before, Some(users)).await
}

/// The users a plan change can touch: its members before and after.
fn plan_users(before: &[Uuid], after: Option<&Vec<Uuid>>) -> Vec<Uuid> {
    let mut users: Vec<Uuid> = before
        .iter()
        .chain(after.into_iter().flatten())
        .copied()
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

impl Store {
    /// Creates a standard access plan.
    pub async fn access_plan_create(
        &self,
        actor: &Actor,
        site: Uuid,
        fields: &AccessPlanFields,
        key: Option<&RequestKey>,
    ) -> Result<AccessPlan, StoreError> {
        in_txn!(self, "access_plan_create", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let users = plan_users(&[], fields.members.as_ref());
            let before = access_rules_for_in_txn(&tx, site, Some(&users)).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return access_plan_get_in_txn(&tx, site, replayed_id(&name)?).await;
            }
            let id: Uuid = tx
                .query_one(
                    "INSERT INTO access_plan (site_id, display_name) VALUES ($1, $2) RETURNING id",
                    &[&site, &fields.display_name.clone().unwrap_or_default()],
                )
                .await?
                .get(0);
            access_plan_write_in_txn(&tx, site, id, fields, &before, &users).await?;
            let name = format!("sites/{site}/accessPlans/{id}");
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "access_plan.create",
                &name,
                serde_json::json!({}),
            )
            .await?;
            access_plan_get_in_txn(&tx, site, id).await
        })
    }

    /// Reads a standard access plan.
    pub async fn access_plan_get(
        &self,
        dealer: Uuid,
        site: Uuid,
        id: Uuid,
    ) -> Result<AccessPlan, StoreError> {
        in_txn!(self, "access_plan_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            access_plan_get_in_txn(&tx, site, id).await
        })
    }

    /// Lists a site's standard access plans by id.
    pub async fn access_plan_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        page: PageRequest,
    ) -> Result<Vec<AccessPlan>, StoreError> {
        in_txn!(self, "access_plan_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            tx.query(
                &format!(
                    "SELECT {ACCESS_PLAN_FIELDS} FROM access_plan p
                     WHERE p.site_id = $1 AND ($2::uuid IS NULL OR p.id > $2) ORDER BY p.id LIMIT $3"
                ),
                &[&site, &page.after, &page.limit],
            )
            .await?
            .iter()
            .map(|r| access_plan_from_row(site, r))
            .collect()
        })
    }

    /// Updates a standard access plan.
    pub async fn access_plan_update(
        &self,
        actor: &Actor,
        site: Uuid,
        id: Uuid,
        fields: &AccessPlanFields,
        etag: &str,
    ) -> Result<AccessPlan, StoreError> {
        in_txn!(self, "access_plan_update", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = access_plan_get_in_txn(&tx, site, id).await?;
            let name = format!("sites/{site}/accessPlans/{id}");
            etag_check(&format!("access plan {name}"), etag, current.version)?;
            let users = plan_users(&current.members, fields.members.as_ref());
            let before = access_rules_for_in_txn(&tx, site, Some(&users)).await?;
            access_plan_write_in_txn(&tx, site, id, fields, &before, &users).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "access_plan.update",
                &name,
                serde_json::json!({}),
            )
            .await?;
            access_plan_get_in_txn(&tx, site, id).await
        })
    }

    /// Deletes a standard access plan.
    pub async fn access_plan_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        id: Uuid,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "access_plan_delete", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = access_plan_get_in_txn(&tx, site, id).await?;
            let name = format!("sites/{site}/accessPlans/{id}");
            etag_check(&format!("access plan {name}"), etag, current.version)?;
            let users = plan_users(&current.members, None);
            let before = access_rules_for_in_txn(&tx, site, Some(&users)).await?;
            tx.execute(
                "DELETE FROM access_plan WHERE site_id = $1 AND id = $2",
                &[&site, &id],
            )
            .await?;
            access_rules_changed_in_txn(&tx, site, &before, Some(&users)).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "access_plan.delete",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }

    /// Adds (or replaces) a holiday.
    pub async fn holiday_put(
        &self,
        actor: &Actor,
        holiday: &Holiday,
    ) -> Result<Holiday, StoreError> {
        in_txn!(self, "holiday_put", |tx| {
            let site = holiday.site;
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let before = access_rules_in_txn(&tx, site).await?;
            for plan in &holiday.plans {
                access_plan_get_in_txn(&tx, site, *plan).await?;
            }
            tx.execute(
                "INSERT INTO holiday (site_id, day, display_name, plan_ids) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (site_id, day) DO UPDATE SET display_name = $3, plan_ids = $4",
                &[&site, &holiday.day, &holiday.display_name, &holiday.plans],
            )
            .await?;
            access_rules_changed_in_txn(&tx, site, &before, None).await?;
            let name = format!("sites/{site}/holidays/{}", holiday.day);
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "holiday.put",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(holiday.clone())
        })
    }

    /// Lists a site's holidays by date.
    pub async fn holiday_list(&self, dealer: Uuid, site: Uuid) -> Result<Vec<Holiday>, StoreError> {
        in_txn!(self, "holiday_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            let rows = tx
                .query(
                    "SELECT day, display_name, plan_ids FROM holiday WHERE site_id = $1 ORDER BY day",
                    &[&site],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Holiday {
                    site,
                    day: r.get(0),
                    display_name: r.get(1),
                    plans: r.get(2),
                })
                .collect())
        })
    }

    /// Deletes a holiday.
    pub async fn holiday_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        day: NaiveDate,
    ) -> Result<(), StoreError> {
        in_txn!(self, "holiday_delete", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let before = access_rules_in_txn(&tx, site).await?;
            let n = tx
                .execute(
                    "DELETE FROM holiday WHERE site_id = $1 AND day = $2",
                    &[&site, &day],
                )
                .await?;
            let name = format!("sites/{site}/holidays/{day}");
            if n == 0 {
                return Err(StoreError::NotFound(format!("holiday {name}")));
            }
            access_rules_changed_in_txn(&tx, site, &before, None).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "holiday.delete",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }

    /// Locks down (or releases) every access-control door of a site: while locked
    /// down, doors refuse every credential whatever the schedules. Who did it is
    /// stored in the event log.
    pub async fn site_lockdown_set(
        &self,
        actor: &Actor,
        site: Uuid,
        lockdown: bool,
    ) -> Result<(), StoreError> {
        in_txn!(self, "site_lockdown_set", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            tx.execute(
                "UPDATE site SET lockdown = $2 WHERE id = $1",
                &[&site, &lockdown],
            )
            .await?;
            // An empty change advances the revision, so agents hear of it.
            site_change_record_in_txn(&tx, site, &[]).await?;
            let kind = if lockdown {
                "lockdown"
            } else {
                "lockdown_released"
            };
            tx.execute(
                "INSERT INTO device_event (site_id, source_seq, kind, occur_time, actor)
                 VALUES ($1, 0, $2, now(), $3)",
                &[&site, &kind, &actor.principal],
            )
            .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                &format!("site.{kind}"),
                &format!("sites/{site}"),
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }
}
