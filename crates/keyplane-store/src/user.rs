//! Users of a site and their authority levels.

use crate::authority::{
    USER_COLUMNS, actor_resolve_in_txn, denied, user_authorities_write_in_txn, user_from_row,
    user_get_in_txn,
};
use crate::credential::{code_facts, credential_delete_in_txn, credential_get_in_txn};
use crate::site::{
    audit_in_txn, etag_check, replayed_id, request_remember_in_txn, request_replay_in_txn,
    site_get_in_txn, site_lock_in_txn, user_slots_changed_in_txn,
};
use crate::{Actor, NewUser, PageRequest, RequestKey, Store, StoreError, User, UserPatch, in_txn};
use crate::{Cached, Transaction};
use keyplane_core::authority::{self as rules, Authorities, open_close_for_new_user};
use uuid::Uuid;

fn all_partitions(a: &Authorities, b: &Authorities) -> Vec<u8> {
    let mut p: Vec<u8> = a.keys().chain(b.keys()).copied().collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Records a change of the panel slots of `user`'s codes scoped to any of `partitions`.
async fn panel_slots_in_partitions_changed_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
    partitions: &[i16],
) -> Result<(), StoreError> {
    let slots: Vec<(Uuid, u16)> = tx
        .query(
            "SELECT DISTINCT sa.device_id, sa.slot FROM slot_assignment sa
             JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
             JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             JOIN credential_partition cp ON cp.site_id = c.site_id AND cp.credential_id = c.id
             WHERE sa.site_id = $1 AND c.user_id = $2 AND d.kind = 'panel' AND cp.partition = ANY($3)",
            &[&site, &user, &partitions],
        )
        .await?
        .iter()
        .map(crate::site::device_slot)
        .collect();
    if !slots.is_empty() {
        crate::site::site_change_record_in_txn(tx, site, &slots).await?;
    }
    Ok(())
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return user_get_in_txn(&tx, site, replayed_id(&name)?).await;
            }
            let (who, acting) = actor_resolve_in_txn(&tx, actor, site).await?;
            who.check_grant(&new.authorities).map_err(denied)?;
            let open_close = open_close_for_new_user(
                acting.as_ref().map(|a| a.open_close_reporting),
                new.open_close_reporting,
            );
            let row = tx
                .query_one(
                    "INSERT INTO site_user (site_id, display_name, open_close_reporting) VALUES ($1, $2, $3) RETURNING id",
                    &[&site, &new.display_name, &open_close],
                )
                .await?;
            let id: Uuid = row.get(0);
            user_authorities_write_in_txn(&tx, site, id, &new.authorities).await?;
            crate::plan::plan_create_in_txn(&tx, site, id).await?;
            let name = format!("sites/{site}/users/{id}");
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            let levels: Vec<(u8, i32)> = new
                .authorities
                .iter()
                .map(|(p, l)| (*p, l.number()))
                .collect();
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "user.create",
                &name,
                serde_json::json!({ "levels": levels }),
            )
            .await?;
            user_get_in_txn(&tx, site, id).await
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = user_get_in_txn(&tx, site, user).await?;
            let name = format!("sites/{site}/users/{user}");
            etag_check(&format!("user {name}"), etag, current.version)?;
            let (who, _) = actor_resolve_in_txn(&tx, actor, site).await?;
            if let Some(authorities) = &patch.authorities {
                // Nobody re-grants their own levels: the target must be strictly below.
                who.check_code_change(
                    &current.authorities,
                    &all_partitions(&current.authorities, authorities),
                    false,
                )
                .map_err(denied)?;
                who.check_grant(authorities).map_err(denied)?;
                user_authorities_write_in_txn(&tx, site, user, authorities).await?;
            }
            if patch.open_close_reporting.is_some() && who != rules::Actor::Dealer {
                return Err(StoreError::PermissionDenied(
                    "only the installer (the dealer) sets open/close reporting; users added by a master or manager inherit it".into(),
                ));
            }
            tx.execute(
                "UPDATE site_user SET display_name = COALESCE($3, display_name),
                    open_close_reporting = COALESCE($4, open_close_reporting),
                    version = version + 1, update_time = now()
                 WHERE site_id = $1 AND id = $2",
                &[
                    &site,
                    &user,
                    &patch.display_name,
                    &patch.open_close_reporting,
                ],
            )
            .await?;
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
            if reporting_changed {
                user_slots_changed_in_txn(&tx, site, user, &["panel"]).await?;
            } else if !levels_changed.is_empty() {
                panel_slots_in_partitions_changed_in_txn(&tx, site, user, &levels_changed).await?;
            }
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "user.update",
                &name,
                serde_json::json!({
                    "display_name": patch.display_name.is_some(),
                    "levels": patch.authorities.as_ref().map(|a| a.iter().map(|(p, l)| (*p, l.number())).collect::<Vec<_>>()),
                    "open_close_reporting": patch.open_close_reporting,
                }),
            )
            .await?;
            user_get_in_txn(&tx, site, user).await
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = user_get_in_txn(&tx, site, user).await?;
            let name = format!("sites/{site}/users/{user}");
            etag_check(&format!("user {name}"), etag, current.version)?;
            let (who, acting) = actor_resolve_in_txn(&tx, actor, site).await?;
            let is_self = acting.is_some_and(|a| a.id == user);
            let rows = tx
                .query(
                    "SELECT id FROM credential WHERE site_id = $1 AND user_id = $2 ORDER BY id",
                    &[&site, &user],
                )
                .await?;
            let devices = crate::device::device_list_for_site_in_txn(&tx, site).await?;
            let mut codes = Vec::with_capacity(rows.len());
            for row in &rows {
                let credential = credential_get_in_txn(&tx, site, user, row.get(0)).await?;
                codes.push(code_facts(&credential, &devices));
            }
            who.check_user_delete(
                &current.authorities,
                &codes,
                actor.acting_partition,
                is_self,
            )
            .map_err(denied)?;
            for row in rows {
                credential_delete_in_txn(&tx, actor, site, user, row.get(0)).await?;
            }
            tx.execute(
                "DELETE FROM site_user WHERE site_id = $1 AND id = $2",
                &[&site, &user],
            )
            .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "user.delete",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }
}
