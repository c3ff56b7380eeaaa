//! Users of a site.

use crate::credential::credential_delete_in_txn;
use crate::site::{
    audit_in_txn, etag_check, replayed_id, request_remember_in_txn, request_replay_in_txn,
    site_get_in_txn, site_lock_in_txn,
};
use crate::{Actor, PageRequest, RequestKey, Store, StoreError, User, in_txn};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

const USER_COLUMNS: &str = "site_id, id, display_name, version, create_time, update_time";

fn user_from_row(row: &Row) -> User {
    User {
        site: row.get(0),
        id: row.get(1),
        display_name: row.get(2),
        version: row.get(3),
        create_time: row.get(4),
        update_time: row.get(5),
    }
}

pub(crate) async fn user_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<User, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM site_user WHERE site_id = $1 AND id = $2"),
            &[&site, &user],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    Ok(user_from_row(&row))
}

impl Store {
    /// Creates a user.
    pub async fn user_create(
        &self,
        actor: &Actor,
        site: Uuid,
        display_name: &str,
        key: Option<&RequestKey>,
    ) -> Result<User, StoreError> {
        in_txn!(self, "user_create", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return user_get_in_txn(&tx, site, replayed_id(&name)?).await;
            }
            let row = tx
                .query_one(
                    &format!("INSERT INTO site_user (site_id, display_name) VALUES ($1, $2) RETURNING {USER_COLUMNS}"),
                    &[&site, &display_name],
                )
                .await?;
            let user = user_from_row(&row);
            let name = format!("sites/{site}/users/{}", user.id);
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "user.create",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(user)
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
                        "SELECT {USER_COLUMNS} FROM site_user WHERE site_id = $1 AND ($2::uuid IS NULL OR id > $2)
                         ORDER BY id LIMIT $3"
                    ),
                    &[&site, &page.after, &page.limit],
                )
                .await?;
            Ok(rows.iter().map(user_from_row).collect())
        })
    }

    /// Renames a user.
    pub async fn user_update(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        display_name: Option<&str>,
        etag: &str,
    ) -> Result<User, StoreError> {
        in_txn!(self, "user_update", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = user_get_in_txn(&tx, site, user).await?;
            let name = format!("sites/{site}/users/{user}");
            etag_check(&format!("user {name}"), etag, current.version)?;
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE site_user SET display_name = COALESCE($3, display_name), version = version + 1,
                            update_time = now() WHERE site_id = $1 AND id = $2 RETURNING {USER_COLUMNS}"
                    ),
                    &[&site, &user, &display_name],
                )
                .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "user.update",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(user_from_row(&row))
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
            let creds = tx
                .query(
                    "SELECT id FROM credential WHERE site_id = $1 AND user_id = $2",
                    &[&site, &user],
                )
                .await?;
            for row in creds {
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
