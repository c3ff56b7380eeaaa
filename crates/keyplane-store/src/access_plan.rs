//! Standard access plans (doors shared by many users), holidays and lockdown.

use crate::credential::{LoadRequest, Loaded, load_in_txn};
use crate::rules::{
    AccessRules, RULES_SQL, holidays_from_rows, rules_from_parts, rules_from_rows,
    schedule_from_json, schedule_json,
};
use crate::site::{
    AuditParams, LogParams, SITE_FIELD_AUDIT_SQL, config_error, etag_check, replayed_id,
    site_change_record_in_txn, site_get_in_txn, site_load_in_txn,
};
use crate::{
    Actor, PageRequest, RequestKey, Step, Store, StoreError, batch_in_txn, in_txn, params,
};
use crate::{Cached, Transaction};
use chrono::NaiveDate;
use keyplane_core::DeviceKind;
use keyplane_core::access::CodeSlot;
use keyplane_core::config::{change_log, holiday_check, holiday_delete_check, holidays_after};
use keyplane_core::schedule::Schedule;
use std::collections::BTreeSet;
use std::time::SystemTime;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
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

/// The slots of the codes of users `$2` (NULL: every user) of site `$1`, with their
/// user and device kind.
const USER_SLOTS_SQL: &str =
    "SELECT sa.device_id, sa.slot, c.user_id, d.kind FROM slot_assignment sa
     JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
     JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
     WHERE sa.site_id = $1 AND ($2::uuid[] IS NULL OR c.user_id = ANY($2))";

/// The slots (rows of [`USER_SLOTS_SQL`]) whose schedules differ between the rules.
fn schedules_changed(rows: &[Row], before: &AccessRules, after: &AccessRules) -> Vec<(Uuid, u16)> {
    let slots: Vec<CodeSlot> = rows
        .iter()
        .map(|r| {
            let kind: Option<&str> = r.get(3);
            (
                crate::site::device_slot(r),
                r.get(2),
                kind.and_then(DeviceKind::parse),
            )
        })
        .collect();
    keyplane_core::access::schedules_changed(&slots, before, after)
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

/// The users whose access a holiday on `$2` (site `$1`) can change, as it is and as
/// it will be with plans `$3` (NULL: removed): members of the plans it pauses, and
/// when it pauses every plan (an empty list), every member and every user with a
/// configured personal plan. Users under no plan have access at any time, holiday or
/// not. Each holiday read starts with it, so all of them fit in one round trip.
const HOLIDAY_USERS_CTE: &str = "WITH h AS (
        SELECT plan_ids FROM holiday WHERE site_id = $1 AND day = $2
        UNION ALL SELECT $3::uuid[] WHERE $3::uuid[] IS NOT NULL
     ), every AS (
        SELECT coalesce(bool_or(cardinality(plan_ids) = 0), false) AS all_plans FROM h
     ), users AS (
        SELECT m.user_id FROM access_plan_member m, every
         WHERE m.site_id = $1
           AND (every.all_plans OR m.plan_id IN (SELECT unnest(plan_ids) FROM h))
        UNION
        SELECT p.user_id FROM personal_access_plan p, every
         WHERE p.site_id = $1 AND p.configured AND every.all_plans
     ) ";

/// The reads of a holiday write after the site lock: the site's holidays, then the
/// personal plans, access points, standard plans and code slots of the users the
/// holiday can change (see [`HOLIDAY_USERS_CTE`]).
fn holiday_reads() -> [String; 5] {
    [
        RULES_SQL[0].to_owned(),
        format!(
            "{HOLIDAY_USERS_CTE} SELECT user_id, schedule FROM personal_access_plan
             WHERE site_id = $1 AND configured AND user_id IN (SELECT user_id FROM users)"
        ),
        format!(
            "{HOLIDAY_USERS_CTE} SELECT user_id, device_id FROM personal_access_point
             WHERE site_id = $1 AND user_id IN (SELECT user_id FROM users)"
        ),
        format!(
            "{HOLIDAY_USERS_CTE} SELECT p.id, p.schedule, m.user_id, d.device_id FROM access_plan p
             JOIN access_plan_member m ON m.site_id = p.site_id AND m.plan_id = p.id
             JOIN access_plan_device d ON d.site_id = p.site_id AND d.plan_id = p.id
             WHERE p.site_id = $1 AND m.user_id IN (SELECT user_id FROM users)"
        ),
        format!(
            "{HOLIDAY_USERS_CTE} SELECT sa.device_id, sa.slot, c.user_id, d.kind FROM slot_assignment sa
             JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
             JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             WHERE sa.site_id = $1 AND c.user_id IN (SELECT user_id FROM users)"
        ),
    ]
}

/// What a holiday write works from: the site locked, its holidays (by day) and the
/// slots whose schedules the holiday can change, with their rules before and after.
struct HolidayLoaded {
    revision: i64,
    holidays: Vec<(NaiveDate, Vec<Uuid>)>,
    changed: Vec<(Uuid, u16)>,
    plans: BTreeSet<Uuid>,
}

/// Loads a holiday write in one round trip (`plans`: what the day will pause; None:
/// the holiday is removed) and decides which slots change.
async fn holiday_load_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    site: Uuid,
    day: NaiveDate,
    plans: Option<&[Uuid]>,
) -> Result<HolidayLoaded, StoreError> {
    let plans_param: Option<Vec<Uuid>> = plans.map(<[Uuid]>::to_vec);
    let named: Vec<Uuid> = plans_param.clone().unwrap_or_default();
    let reads = holiday_reads();
    let mut extra: Vec<Step<'_>> = vec![(reads[0].as_str(), params![&site])];
    for sql in &reads[1..] {
        extra.push((sql.as_str(), params![&site, &day, &plans_param]));
    }
    extra.push((
        "SELECT id FROM access_plan WHERE site_id = $1 AND id = ANY($2)",
        params![&site, &named],
    ));
    let l = site_load_in_txn(tx, dealer, site, None, extra).await?;
    let mut holidays = holidays_from_rows(&l.extra[0]);
    holidays.sort_by_key(|(d, _)| *d);
    let after = holidays_after(&holidays, day, plans);
    let before_rules = rules_from_parts(&holidays, &l.extra[1], &l.extra[2], &l.extra[3])?;
    let after_rules = rules_from_parts(&after, &l.extra[1], &l.extra[2], &l.extra[3])?;
    let changed = schedules_changed(&l.extra[4], &before_rules, &after_rules);
    Ok(HolidayLoaded {
        revision: l.site.revision,
        holidays,
        changed,
        plans: l.extra[5].iter().map(|r| r.get(0)).collect(),
    })
}

/// What a plan change works from: the site locked and its devices, the plan as it
/// stands, which of the named members exist, and the access rules of every member
/// before and after the change, as they are now. One round trip.
struct PlanLoaded {
    loaded: Loaded,
    current: Option<AccessPlan>,
    existing_members: Vec<Uuid>,
    before: AccessRules,
}

async fn plan_load_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    plan: Option<Uuid>,
    members: &[Uuid],
    key: Option<&RequestKey>,
) -> Result<PlanLoaded, StoreError> {
    let members = members.to_vec();
    let plan_sql = format!(
        "SELECT {ACCESS_PLAN_FIELDS} FROM access_plan p WHERE p.site_id = $1 AND p.id = $2"
    );
    let by_site: &[&(dyn ToSql + Sync)] = &[&site];
    let by_plan: &[&(dyn ToSql + Sync)] = &[&site, &plan];
    let by_members: &[&(dyn ToSql + Sync)] = &[&site, &members];
    // Members named now, and members of the plan as it stands.
    let by_users: &[&(dyn ToSql + Sync)] = &[&site, &members, &plan];
    let extra = [
        (plan_sql.as_str(), by_plan),
        (
            "SELECT id FROM site_user WHERE site_id = $1 AND id = ANY($2) AND NOT system",
            by_members,
        ),
        (RULES_SQL[0], by_site),
        (RULES_SQL[1], by_users),
        (RULES_SQL[2], by_users),
        (RULES_SQL[3], by_users),
    ];
    let loaded = load_in_txn(
        tx,
        actor,
        site,
        LoadRequest {
            key,
            extra: &extra,
            ..LoadRequest::default()
        },
    )
    .await?;
    let current = loaded.extra[0]
        .first()
        .map(|r| access_plan_from_row(site, r))
        .transpose()?;
    let existing_members = loaded.extra[1].iter().map(|r| r.get(0)).collect();
    let before = rules_from_rows(
        &loaded.extra[2],
        &loaded.extra[3],
        &loaded.extra[4],
        &loaded.extra[5],
    )?;
    Ok(PlanLoaded {
        loaded,
        current,
        existing_members,
        before,
    })
}

impl PlanLoaded {
    /// Checks the devices and members a change names, in that order.
    fn check(&self, site: Uuid, fields: &AccessPlanFields) -> Result<(), StoreError> {
        for d in fields.devices.iter().flatten() {
            let device = self
                .loaded
                .devices
                .iter()
                .find(|x| x.id == *d)
                .ok_or_else(|| StoreError::NotFound(format!("device sites/{site}/devices/{d}")))?;
            if !matches!(device.kind(), DeviceKind::Door | DeviceKind::Lock) {
                return Err(StoreError::InvalidArgument(format!(
                    "device {} is a panel: standard access plans schedule doors (and locks); the panel follows personal access plans",
                    device.name()
                )));
            }
        }
        if let Some(u) = fields
            .members
            .iter()
            .flatten()
            .find(|u| !self.existing_members.contains(u))
        {
            return Err(StoreError::NotFound(format!("user sites/{site}/users/{u}")));
        }
        Ok(())
    }
}

/// Writes `steps` (a plan change), then reads the access rules and code slots of
/// `users` in the same round trip, records the slots whose schedules changed and
/// returns the rows of `steps`.
async fn plan_change_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    steps: Vec<Step<'_>>,
    users: &[Uuid],
    before: &AccessRules,
) -> Result<Vec<Vec<Row>>, StoreError> {
    let users = Some(users.to_vec());
    let plan: Option<Uuid> = None;
    let n = steps.len();
    let mut steps = steps;
    steps.push((RULES_SQL[0], params![&site]));
    for sql in &RULES_SQL[1..] {
        steps.push((sql, params![&site, &users, &plan]));
    }
    steps.push((USER_SLOTS_SQL, params![&site, &users]));
    let mut rows = batch_in_txn(tx, &steps).await?;
    let after = rules_from_rows(&rows[n], &rows[n + 1], &rows[n + 2], &rows[n + 3])?;
    let changed = schedules_changed(&rows[n + 4], before, &after);
    if !changed.is_empty() {
        site_change_record_in_txn(tx, site, &changed).await?;
    }
    rows.truncate(n);
    Ok(rows)
}

/// The statements that apply `fields` to plan `id`: devices, members, then the row.
fn plan_steps<'a>(
    site: &'a Uuid,
    id: &'a Uuid,
    fields: &'a AccessPlanFields,
    has_schedule: &'a bool,
    flat_schedule: &'a Option<serde_json::Value>,
) -> Vec<Step<'a>> {
    let mut steps: Vec<Step<'a>> = Vec::new();
    if let Some(devices) = &fields.devices {
        steps.push((
            "DELETE FROM access_plan_device WHERE site_id = $1 AND plan_id = $2",
            vec![site, id],
        ));
        steps.push((
            "INSERT INTO access_plan_device (site_id, plan_id, device_id) SELECT $1, $2, unnest($3::uuid[])",
            vec![site, id, devices],
        ));
    }
    if let Some(members) = &fields.members {
        steps.push((
            "DELETE FROM access_plan_member WHERE site_id = $1 AND plan_id = $2",
            vec![site, id],
        ));
        steps.push((
            "INSERT INTO access_plan_member (site_id, plan_id, user_id) SELECT $1, $2, unnest($3::uuid[])",
            vec![site, id, members],
        ));
    }
    steps.push((
        "UPDATE access_plan SET display_name = COALESCE($3, display_name),
            schedule = CASE WHEN $4 THEN $5 ELSE schedule END,
            version = version + 1, update_time = now()
         WHERE site_id = $1 AND id = $2",
        vec![site, id, &fields.display_name, has_schedule, flat_schedule],
    ));
    steps
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

/// An audit row for holiday `$10` of site `$2`, its before value read by the statement
/// (run it before the write), its after value `$11`.
const HOLIDAY_AUDIT_SQL: &str = "INSERT INTO audit_log
        (dealer_id, site_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9,
        (SELECT jsonb_build_object('display_name', display_name, 'plans', plan_ids)
           FROM holiday WHERE site_id = $2 AND day = $10),
        $11";

/// A standard access plan as the audit log records it before or after a change.
fn access_plan_audit_json(
    display_name: &str,
    devices: &[Uuid],
    members: &[Uuid],
    schedule: Option<&Schedule>,
) -> serde_json::Value {
    let sorted = |ids: &[Uuid]| {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    serde_json::json!({
        "display_name": display_name,
        "devices": sorted(devices),
        "members": sorted(members),
        "schedule": schedule,
    })
}

/// The plan `current` (None: a new one) becomes once `fields` are applied.
fn access_plan_after(current: Option<&AccessPlan>, fields: &AccessPlanFields) -> serde_json::Value {
    let empty: &[Uuid] = &[];
    access_plan_audit_json(
        fields
            .display_name
            .as_deref()
            .or(current.map(|c| c.display_name.as_str()))
            .unwrap_or_default(),
        fields
            .devices
            .as_deref()
            .or(current.map(|c| c.devices.as_slice()))
            .unwrap_or(empty),
        fields
            .members
            .as_deref()
            .or(current.map(|c| c.members.as_slice()))
            .unwrap_or(empty),
        match &fields.schedule {
            Some(s) => s.as_ref(),
            None => current.and_then(|c| c.schedule.as_ref()),
        },
    )
}

fn access_plan_before(current: &AccessPlan) -> serde_json::Value {
    access_plan_audit_json(
        &current.display_name,
        &current.devices,
        &current.members,
        current.schedule.as_ref(),
    )
}

/// Runs a plan's write `steps`, then its audit entry and the read-back of the plan, in
/// the same round trip (create and update end alike).
async fn plan_write_audited_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    id: Uuid,
    audit: AuditParams,
    steps: Vec<Step<'_>>,
    users: &[Uuid],
    before: &AccessRules,
) -> Result<AccessPlan, StoreError> {
    let read_sql = format!(
        "SELECT {ACCESS_PLAN_FIELDS} FROM access_plan p WHERE p.site_id = $1 AND p.id = $2"
    );
    let mut steps: Vec<Step<'_>> = steps;
    steps.push(audit.step());
    steps.push((read_sql.as_str(), params![&site, &id]));
    let rows = plan_change_in_txn(tx, site, steps, users, before).await?;
    let row = rows
        .last()
        .and_then(|r| r.first())
        .ok_or_else(|| StoreError::Internal("access plan not read back".into()))?;
    access_plan_from_row(site, row)
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
        let schedule = match &fields.schedule {
            Some(sch) => Some(schedule_json(sch)?),
            None => None,
        };
        let has_schedule = schedule.is_some();
        let flat_schedule = schedule.clone().flatten();
        let display_name = fields.display_name.clone().unwrap_or_default();
        in_txn!(self, "access_plan_create", |tx| {
            let members = fields.members.clone().unwrap_or_default();
            let l = plan_load_in_txn(&tx, actor, site, None, &members, key).await?;
            if let Some(name) = &l.loaded.replayed {
                return access_plan_get_in_txn(&tx, site, replayed_id(name)?).await;
            }
            l.check(site, fields)?;
            let id = Uuid::new_v4();
            let name = format!("sites/{site}/accessPlans/{id}");
            let users = plan_users(&[], fields.members.as_ref());
            let audit = AuditParams::new(
                actor,
                Some(site),
                "access_plan.create",
                &name,
                serde_json::json!({}),
            )
            .after(access_plan_after(None, fields));
            let mut steps: Vec<Step<'_>> = vec![(
                "INSERT INTO access_plan (site_id, id, display_name) VALUES ($1, $2, $3)",
                params![&site, &id, &display_name],
            )];
            steps.extend(plan_steps(
                &site,
                &id,
                fields,
                &has_schedule,
                &flat_schedule,
            ));
            if let Some(k) = key {
                steps.push((
                    "INSERT INTO idempotency_key (dealer_id, request_id, method, fingerprint, resource_name)
                     VALUES ($1, $2, $3, $4, $5)",
                    params![&actor.dealer, &k.request_id, &k.method, &k.fingerprint, &name],
                ));
            }
            plan_write_audited_in_txn(&tx, site, id, audit, steps, &users, &l.before).await
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
        let schedule = match &fields.schedule {
            Some(sch) => Some(schedule_json(sch)?),
            None => None,
        };
        let has_schedule = schedule.is_some();
        let flat_schedule = schedule.clone().flatten();
        in_txn!(self, "access_plan_update", |tx| {
            let members = fields.members.clone().unwrap_or_default();
            let l = plan_load_in_txn(&tx, actor, site, Some(id), &members, None).await?;
            let current = l.current.as_ref().ok_or_else(|| {
                StoreError::NotFound(format!("access plan sites/{site}/accessPlans/{id}"))
            })?;
            let name = format!("sites/{site}/accessPlans/{id}");
            etag_check(&format!("access plan {name}"), etag, current.version)?;
            l.check(site, fields)?;
            let users = plan_users(&current.members, fields.members.as_ref());
            let audit = AuditParams::new(
                actor,
                Some(site),
                "access_plan.update",
                &name,
                serde_json::json!({}),
            )
            .before(access_plan_before(current))
            .after(access_plan_after(Some(current), fields));
            let steps = plan_steps(&site, &id, fields, &has_schedule, &flat_schedule);
            plan_write_audited_in_txn(&tx, site, id, audit, steps, &users, &l.before).await
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
            let l = plan_load_in_txn(&tx, actor, site, Some(id), &[], None).await?;
            let current = l.current.as_ref().ok_or_else(|| {
                StoreError::NotFound(format!("access plan sites/{site}/accessPlans/{id}"))
            })?;
            let name = format!("sites/{site}/accessPlans/{id}");
            etag_check(&format!("access plan {name}"), etag, current.version)?;
            let users = plan_users(&current.members, None);
            let audit = AuditParams::new(
                actor,
                Some(site),
                "access_plan.delete",
                &name,
                serde_json::json!({}),
            )
            .before(access_plan_before(current));
            let steps: Vec<Step<'_>> = vec![
                (
                    "DELETE FROM access_plan WHERE site_id = $1 AND id = $2",
                    params![&site, &id],
                ),
                audit.step(),
            ];
            plan_change_in_txn(&tx, site, steps, &users, &l.before).await?;
            Ok(())
        })
    }

    /// Adds (or replaces) a holiday: one round trip locks the site and loads the
    /// rules of the users it can change, one writes it with the changed slots.
    pub async fn holiday_put(
        &self,
        actor: &Actor,
        holiday: &Holiday,
    ) -> Result<Holiday, StoreError> {
        let site = holiday.site;
        in_txn!(self, "holiday_put", |tx| {
            let l = holiday_load_in_txn(&tx, actor.dealer, site, holiday.day, Some(&holiday.plans))
                .await?;
            holiday_check(&holiday.plans, &l.plans).map_err(|e| config_error(site, e))?;
            let log = LogParams::new(change_log(l.revision, &l.changed, false).as_ref());
            let name = format!("sites/{site}/holidays/{}", holiday.day);
            let audit = AuditParams::new(
                actor,
                Some(site),
                "holiday.put",
                &name,
                serde_json::json!({}),
            );
            let after = Some(serde_json::json!({
                "display_name": holiday.display_name,
                "plans": holiday.plans,
            }));
            batch_in_txn(
                &tx,
                &[
                    audit.step_in(HOLIDAY_AUDIT_SQL, params![&holiday.day, &after]),
                    (
                        "INSERT INTO holiday (site_id, day, display_name, plan_ids) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (site_id, day) DO UPDATE SET display_name = $3, plan_ids = $4",
                        params![&site, &holiday.day, &holiday.display_name, &holiday.plans],
                    ),
                    log.step(&site),
                ],
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

    /// Deletes a holiday: one round trip locks the site and loads the rules of the
    /// users it changes, one deletes it with the changed slots.
    pub async fn holiday_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        day: NaiveDate,
    ) -> Result<(), StoreError> {
        in_txn!(self, "holiday_delete", |tx| {
            let l = holiday_load_in_txn(&tx, actor.dealer, site, day, None).await?;
            let exists = l.holidays.iter().any(|(d, _)| *d == day);
            holiday_delete_check(day, exists).map_err(|e| config_error(site, e))?;
            let log = LogParams::new(change_log(l.revision, &l.changed, false).as_ref());
            let name = format!("sites/{site}/holidays/{day}");
            let audit = AuditParams::new(
                actor,
                Some(site),
                "holiday.delete",
                &name,
                serde_json::json!({}),
            );
            let after: Option<serde_json::Value> = None;
            batch_in_txn(
                &tx,
                &[
                    audit.step_in(HOLIDAY_AUDIT_SQL, params![&day, &after]),
                    (
                        "DELETE FROM holiday WHERE site_id = $1 AND day = $2",
                        params![&site, &day],
                    ),
                    log.step(&site),
                ],
            )
            .await?;
            Ok(())
        })
    }

    /// Locks down (or releases) every access-control door of a site: while locked
    /// down, doors refuse every credential whatever the schedules. Who did it is
    /// stored in the event log. One round trip locks the site, one writes.
    pub async fn site_lockdown_set(
        &self,
        actor: &Actor,
        site: Uuid,
        lockdown: bool,
    ) -> Result<(), StoreError> {
        in_txn!(self, "site_lockdown_set", |tx| {
            let l = site_load_in_txn(&tx, actor.dealer, site, None, Vec::new()).await?;
            // An empty change advances the revision, so agents hear of it.
            let log = LogParams::new(change_log(l.site.revision, &[], true).as_ref());
            let kind = if lockdown {
                "lockdown"
            } else {
                "lockdown_released"
            };
            let audit = AuditParams::new(
                actor,
                Some(site),
                &format!("site.{kind}"),
                &format!("sites/{site}"),
                serde_json::json!({}),
            );
            let after = Some(serde_json::json!({ "lockdown": lockdown }));
            batch_in_txn(
                &tx,
                &[
                    audit.step_in(SITE_FIELD_AUDIT_SQL, params![&"lockdown", &after]),
                    (
                        "UPDATE site SET lockdown = $2 WHERE id = $1",
                        params![&site, &lockdown],
                    ),
                    log.step(&site),
                    (
                        "INSERT INTO device_event (site_id, source_seq, kind, occur_time, actor)
                         VALUES ($1, 0, $2, now(), $3)",
                        params![&site, &kind, &actor.principal],
                    ),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
