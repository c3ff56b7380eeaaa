//! Users of a site and their authority levels.

use crate::Cached;
use crate::authority::{USER_COLUMNS, actor_from_loaded, denied, user_from_row, user_get_in_txn};
use crate::credential::{LoadRequest, code_facts, load_in_txn};
use crate::site::{
    AUDIT_FULL_SQL, etag_check, replayed_id, site_get_in_txn, user_slots_changed_sql,
};
use crate::{Actor, NewUser, PageRequest, RequestKey, Store, StoreError, User, UserPatch, in_txn};
use keyplane_core::authority::{self as rules, Authorities, open_close_for_new_user};
use tokio_postgres::Client as Pg;
use uuid::Uuid;

fn all_partitions(a: &Authorities, b: &Authorities) -> Vec<u8> {
    let mut p: Vec<u8> = a.keys().chain(b.keys()).copied().collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Records a change of the panel slots of `user` (`$2`) codes scoped to any of the
/// partitions `$3`.
fn panel_slots_in_partitions_changed_sql() -> String {
    crate::site::changes_record_sql(
        "SELECT sa.device_id, sa.slot FROM slot_assignment sa
         JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
         JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
         JOIN credential_partition cp ON cp.site_id = c.site_id AND cp.credential_id = c.id
         WHERE sa.site_id = $1 AND c.user_id = $2 AND d.kind = 'panel' AND cp.partition = ANY($3)",
    )
}

/// Inserts a user's levels (site, user, partitions, levels).
const LEVELS_INSERT_SQL: &str = "INSERT INTO user_authority (site_id, user_id, partition, level)
     SELECT $1, $2, p, l FROM unnest($3::smallint[], $4::smallint[]) AS a(p, l)";

/// Remembers an idempotency key (dealer, request id, method, fingerprint, resource).
const REMEMBER_SQL: &str =
    "INSERT INTO idempotency_key (dealer_id, request_id, method, fingerprint, resource_name)
     VALUES ($1, $2, $3, $4, $5)";

/// Levels may be granted only in partitions the site has, checked in partition order.
fn partitions_check(
    site: Uuid,
    partitions: &std::collections::BTreeSet<u8>,
    authorities: &Authorities,
) -> Result<(), StoreError> {
    match authorities.keys().find(|p| !partitions.contains(p)) {
        Some(p) => Err(StoreError::NotFound(format!(
            "partition sites/{site}/partitions/{p}"
        ))),
        None => Ok(()),
    }
}

/// Levels as the parameters of [`LEVELS_INSERT_SQL`].
fn authorities_params(authorities: &Authorities) -> (Vec<i16>, Vec<i16>) {
    authorities
        .iter()
        .map(|(p, l)| (i16::from(*p), i16::try_from(l.number()).unwrap_or(i16::MAX)))
        .unzip()
}

/// A user as the audit log records it before or after a change (never a PIN; the
/// display name is replaced when the person is erased).
fn user_audit_json(
    display_name: &str,
    authorities: &Authorities,
    open_close_reporting: bool,
) -> serde_json::Value {
    let levels: Vec<(u8, i32)> = authorities.iter().map(|(p, l)| (*p, l.number())).collect();
    serde_json::json!({
        "display_name": display_name,
        "levels": levels,
        "open_close_reporting": open_close_reporting,
    })
}

impl Store {
    /// Creates a user with levels the actor may grant.
    pub async fn user_create(
        &self,
        actor: &Actor,
        site: Uuid,
        new: &NewUser,
        key: Option<&RequestKey>,
    ) -> Result<User, StoreError> {
        in_txn!(self, "user_create", |tx| {
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    key,
                    ..LoadRequest::default()
                },
            )
            .await?;
            if let Some(name) = &loaded.replayed {
                return user_get_in_txn(&tx, site, replayed_id(name)?).await;
            }
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            who.check_grant(&new.authorities).map_err(denied)?;
            partitions_check(site, &loaded.partitions, &new.authorities)?;
            let open_close = open_close_for_new_user(
                acting.as_ref().map(|a| a.open_close_reporting),
                new.open_close_reporting,
            );
            let id = Uuid::new_v4();
            let name = format!("sites/{site}/users/{id}");
            let levels: Vec<(u8, i32)> = new
                .authorities
                .iter()
                .map(|(p, l)| (*p, l.number()))
                .collect();
            let detail = serde_json::json!({ "levels": levels });
            let after = Some(user_audit_json(
                &new.display_name,
                &new.authorities,
                open_close,
            ));
            let before: Option<serde_json::Value> = None;
            let (partitions, level_numbers) = authorities_params(&new.authorities);
            let get_sql = format!(
                "SELECT {USER_COLUMNS} FROM site_user u WHERE u.site_id = $1 AND u.id = $2"
            );
            let (s_user, s_levels, s_plan, s_remember, s_audit, s_get) = tokio::try_join!(
                tx.prepare_cached(
                    "INSERT INTO site_user (site_id, id, display_name, open_close_reporting, system) VALUES ($1, $2, $3, $4, $5)"
                ),
                tx.prepare_cached(LEVELS_INSERT_SQL),
                tx.prepare_cached(
                    "INSERT INTO personal_access_plan (site_id, user_id) VALUES ($1, $2)"
                ),
                tx.prepare_cached(REMEMBER_SQL),
                tx.prepare_cached(AUDIT_FULL_SQL),
                tx.prepare_cached(&get_sql),
            )?;
            let (inserted, levels_written, planned, remembered, audited, read) = tokio::join!(
                biased;
                async { Pg::execute(&tx, &s_user, &[&site, &id, &new.display_name, &open_close, &new.system]).await },
                async { Pg::execute(&tx, &s_levels, &[&site, &id, &partitions, &level_numbers]).await },
                async { Pg::execute(&tx, &s_plan, &[&site, &id]).await },
                async {
                    match key {
                        None => Ok(0),
                        Some(k) => Pg::execute(&tx, &s_remember, &[&actor.dealer, &k.request_id, &k.method, &k.fingerprint, &name]).await,
                    }
                },
                async { Pg::execute(&tx, &s_audit, &[&actor.dealer, &Some(site), &actor.principal, &"user.create", &name, &actor.peer, &detail, &actor.acting_as, &actor.request_id, &before, &after]).await },
                async { Pg::query_one(&tx, &s_get, &[&site, &id]).await },
            );
            inserted?;
            levels_written?;
            planned?;
            remembered?;
            audited?;
            Ok(user_from_row(&read?))
        })
    }

    /// Reads a user.
    pub async fn user_get(&self, dealer: Uuid, site: Uuid, user: Uuid) -> Result<User, StoreError> {
        in_txn!(self, "user_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            user_get_in_txn(&tx, site, user).await
        })
    }

    /// Lists a site's users by id.
    pub async fn user_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        page: PageRequest,
    ) -> Result<Vec<User>, StoreError> {
        in_txn!(self, "user_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {USER_COLUMNS} FROM site_user u WHERE u.site_id = $1 AND ($2::uuid IS NULL OR u.id > $2)
                           AND NOT u.system
                         ORDER BY u.id LIMIT $3"
                    ),
                    &[&site, &page.after, &page.limit],
                )
                .await?;
            Ok(rows.iter().map(user_from_row).collect())
        })
    }

    /// Renames a user, changes their levels, or their open/close reporting.
    pub async fn user_update(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        patch: &UserPatch,
        etag: &str,
    ) -> Result<User, StoreError> {
        in_txn!(self, "user_update", |tx| {
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    user_row: true,
                    ..LoadRequest::default()
                },
            )
            .await?;
            // keyplane's own users are not changed through the user API.
            let current = loaded
                .user_row
                .clone()
                .filter(|u| !u.system)
                .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
            let name = format!("sites/{site}/users/{user}");
            etag_check(&format!("user {name}"), etag, current.version)?;
            let (who, _) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            if let Some(authorities) = &patch.authorities {
                who.check_level_change(
                    &current.authorities,
                    &all_partitions(&current.authorities, authorities),
                )
                .map_err(denied)?;
                who.check_grant(authorities).map_err(denied)?;
                partitions_check(site, &loaded.partitions, authorities)?;
            }
            if patch.open_close_reporting.is_some() && who != rules::Actor::Dealer {
                return Err(StoreError::PermissionDenied(
                    "only the installer (the dealer) sets open/close reporting; users added by a master or manager inherit it".into(),
                ));
            }
            // Levels and open/close reporting are programmed into the panel with each
            // user number; a level in a partition none of the codes is scoped to, or a
            // value set to what it was, changes nothing there.
            let reporting_changed = patch
                .open_close_reporting
                .is_some_and(|v| v != current.open_close_reporting);
            let levels_changed: Vec<i16> = patch
                .authorities
                .as_ref()
                .map(|new| {
                    all_partitions(&current.authorities, new)
                        .into_iter()
                        .filter(|p| current.authorities.get(p) != new.get(p))
                        .map(i16::from)
                        .collect()
                })
                .unwrap_or_default();
            let detail = serde_json::json!({
                "display_name": patch.display_name.is_some(),
                "levels": patch.authorities.as_ref().map(|a| a.iter().map(|(p, l)| (*p, l.number())).collect::<Vec<_>>()),
                "open_close_reporting": patch.open_close_reporting,
            });
            let before = Some(user_audit_json(
                &current.display_name,
                &current.authorities,
                current.open_close_reporting,
            ));
            let after = Some(user_audit_json(
                patch
                    .display_name
                    .as_deref()
                    .unwrap_or(&current.display_name),
                patch.authorities.as_ref().unwrap_or(&current.authorities),
                patch
                    .open_close_reporting
                    .unwrap_or(current.open_close_reporting),
            ));
            let (partitions, levels) = patch
                .authorities
                .as_ref()
                .map(authorities_params)
                .unwrap_or_default();
            let kinds = ["panel"];
            let get_sql = format!(
                "SELECT {USER_COLUMNS} FROM site_user u WHERE u.site_id = $1 AND u.id = $2"
            );
            let reporting_sql = user_slots_changed_sql();
            let levels_sql = panel_slots_in_partitions_changed_sql();
            let (s_delete, s_insert, s_update, s_reporting, s_levels, s_audit, s_get) = tokio::try_join!(
                tx.prepare_cached("DELETE FROM user_authority WHERE site_id = $1 AND user_id = $2"),
                tx.prepare_cached(LEVELS_INSERT_SQL),
                tx.prepare_cached(
                    "UPDATE site_user SET display_name = COALESCE($3, display_name),
                        open_close_reporting = COALESCE($4, open_close_reporting),
                        version = version + 1, update_time = now()
                     WHERE site_id = $1 AND id = $2"
                ),
                tx.prepare_cached(&reporting_sql),
                tx.prepare_cached(&levels_sql),
                tx.prepare_cached(AUDIT_FULL_SQL),
                tx.prepare_cached(&get_sql),
            )?;
            let new_levels = patch.authorities.is_some();
            let (deleted, inserted, updated, reporting, levels_done, audited, read) = tokio::join!(
                biased;
                async { if new_levels { Pg::execute(&tx, &s_delete, &[&site, &user]).await } else { Ok(0) } },
                async { if new_levels { Pg::execute(&tx, &s_insert, &[&site, &user, &partitions, &levels]).await } else { Ok(0) } },
                async { Pg::execute(&tx, &s_update, &[&site, &user, &patch.display_name, &patch.open_close_reporting]).await },
                async { if reporting_changed { Pg::execute(&tx, &s_reporting, &[&site, &user, &kinds.as_slice()]).await } else { Ok(0) } },
                async {
                    if !reporting_changed && !levels_changed.is_empty() {
                        Pg::execute(&tx, &s_levels, &[&site, &user, &levels_changed]).await
                    } else {
                        Ok(0)
                    }
                },
                async { Pg::execute(&tx, &s_audit, &[&actor.dealer, &Some(site), &actor.principal, &"user.update", &name, &actor.peer, &detail, &actor.acting_as, &actor.request_id, &before, &after]).await },
                async { Pg::query_one(&tx, &s_get, &[&site, &user]).await },
            );
            deleted?;
            inserted?;
            updated?;
            reporting?;
            levels_done?;
            audited?;
            Ok(user_from_row(&read?))
        })
    }

    /// Deletes a user and every credential they hold (their slots are cleared on devices).
    pub async fn user_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "user_delete", |tx| {
            user_delete_in_txn(&tx, actor, site, user, Some(etag), "user.delete").await?;
            Ok(())
        })
    }
}

/// Deletes a user and every credential they hold, after the actor's checks (and the
/// etag's, when given); audited as `action`. Returns the deleted credentials' ids.
pub(crate) async fn user_delete_in_txn(
    tx: &crate::Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
    etag: Option<&str>,
    action: &str,
) -> Result<Vec<Uuid>, StoreError> {
    let loaded = load_in_txn(
        tx,
        actor,
        site,
        LoadRequest {
            user,
            user_row: true,
            codes: true,
            ..LoadRequest::default()
        },
    )
    .await?;
    // keyplane's own users are neither deleted nor erased through the user API.
    let current = loaded
        .user_row
        .as_ref()
        .filter(|u| !u.system)
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    let name = format!("sites/{site}/users/{user}");
    if let Some(etag) = etag {
        etag_check(&format!("user {name}"), etag, current.version)?;
    }
    let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
    let is_self = acting.is_some_and(|a| a.id == user);
    let codes: Vec<_> = loaded
        .codes
        .iter()
        .map(|c| code_facts(c, &loaded.devices))
        .collect();
    who.check_user_delete(
        &current.authorities,
        &codes,
        actor.acting_partition,
        is_self,
    )
    .map_err(denied)?;
    // Each code's deletion is audited as if deleted alone.
    let ids: Vec<Uuid> = loaded.codes.iter().map(|c| c.id).collect();
    let names: Vec<String> = loaded
        .codes
        .iter()
        .map(|c| format!("sites/{site}/users/{user}/credentials/{}", c.id))
        .collect();
    let details: Vec<serde_json::Value> = loaded
        .codes
        .iter()
        .map(|c| serde_json::json!({ "slots_freed": c.slots.len() }))
        .collect();
    let befores: Vec<serde_json::Value> = loaded
        .codes
        .iter()
        .map(|c| {
            crate::credential::credential_audit_json(
                &c.display_name,
                &c.scope,
                c.valid_from,
                c.valid_until,
                c.max_uses,
            )
        })
        .collect();
    let (s_slots, s_codes, s_code_audit, s_user, s_audit) = tokio::try_join!(
        tx.prepare_cached(
            "WITH freed AS (
                DELETE FROM slot_assignment WHERE site_id = $1 AND credential_id = ANY($2::uuid[])
                RETURNING device_id, slot
             ), head AS (
                UPDATE site SET revision = revision + 1
                 WHERE id = $1 AND EXISTS (SELECT 1 FROM freed) RETURNING revision
             )
             INSERT INTO site_change (site_id, revision, device_id, slot)
             SELECT $1, head.revision, freed.device_id, freed.slot FROM head, freed
             ON CONFLICT DO NOTHING"
        ),
        tx.prepare_cached("DELETE FROM credential WHERE site_id = $1 AND id = ANY($2::uuid[])"),
        tx.prepare_cached(
            "INSERT INTO audit_log (dealer_id, site_id, actor, action, resource, peer, detail, acting_user, request_id, before)
             SELECT $1, $2, $3, 'credential.delete', r, $4, d, $7, $8, b
               FROM unnest($5::text[], $6::jsonb[], $9::jsonb[]) AS a(r, d, b)"
        ),
        tx.prepare_cached("DELETE FROM site_user WHERE site_id = $1 AND id = $2"),
        tx.prepare_cached(AUDIT_FULL_SQL),
    )?;
    let detail = serde_json::json!({});
    let before = Some(user_audit_json(
        &current.display_name,
        &current.authorities,
        current.open_close_reporting,
    ));
    let after: Option<serde_json::Value> = None;
    let (freed, deleted, code_audits, user_deleted, audited) = tokio::join!(
        biased;
        async { Pg::execute(tx, &s_slots, &[&site, &ids]).await },
        async { Pg::execute(tx, &s_codes, &[&site, &ids]).await },
        async { Pg::execute(tx, &s_code_audit, &[&actor.dealer, &Some(site), &actor.principal, &actor.peer, &names, &details, &actor.acting_as, &actor.request_id, &befores]).await },
        async { Pg::execute(tx, &s_user, &[&site, &user]).await },
        async { Pg::execute(tx, &s_audit, &[&actor.dealer, &Some(site), &actor.principal, &action, &name, &actor.peer, &detail, &actor.acting_as, &actor.request_id, &before, &after]).await },
    );
    freed?;
    deleted?;
    code_audits?;
    user_deleted?;
    audited?;
    Ok(ids)
}
