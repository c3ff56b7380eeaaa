//! Loading who acts and what levels users hold, for the rules in
//! `keyplane_core::authority`. Checks run inside the write's transaction, so the
//! levels they see are the ones the write commits against.

use crate::{Actor, Store, StoreError, User, in_txn};
use crate::{Cached, Transaction};
use keyplane_core::authority::{
    self as rules, ACTING_PARTITION_HEADER, Authorities, AuthorityError, Level,
};
use std::collections::{BTreeSet, HashMap};
use tokio_postgres::Row;
use uuid::Uuid;

/// The acting site user, when one acts.
#[derive(Debug, Clone)]
pub(crate) struct ActingUser {
    pub id: Uuid,
    pub open_close_reporting: bool,
}

pub(crate) fn denied(e: AuthorityError) -> StoreError {
    if e.is_precondition() {
        StoreError::FailedPrecondition(e.to_string())
    } else {
        StoreError::PermissionDenied(e.to_string())
    }
}

/// Levels of `user` per partition.
pub(crate) async fn user_authorities_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<Authorities, StoreError> {
    let rows = tx
        .query(
            "SELECT partition, level FROM user_authority WHERE site_id = $1 AND user_id = $2",
            &[&site, &user],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let p = u8::try_from(r.get::<_, i16>(0)).ok()?;
            let l = Level::from_number(i32::from(r.get::<_, i16>(1)))?;
            Some((p, l))
        })
        .collect())
}

/// Who acts on `site`: the dealer, or a user of that site with their levels. The
/// partition named in `keyplane-acting-partition` is checked here, for every call
/// that resolves its actor: a user acts only from a partition they hold, the dealer
/// only from one the site has.
pub(crate) async fn actor_resolve_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
) -> Result<(rules::Actor, Option<ActingUser>), StoreError> {
    let Some((user_site, user)) = actor.acting_user else {
        if let Some(p) = actor.acting_partition {
            crate::partition::partition_get_in_txn(tx, site, p)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound(_) => StoreError::InvalidArgument(format!(
                        "{ACTING_PARTITION_HEADER} names partition {p}, which sites/{site} does not have"
                    )),
                    e => e,
                })?;
        }
        return Ok((rules::Actor::Dealer, None));
    };
    let name = format!("sites/{user_site}/users/{user}");
    if user_site != site {
        return Err(StoreError::PermissionDenied(format!(
            "acting user {name} is not a user of sites/{site}"
        )));
    }
    let row = tx
        .query_opt(
            "SELECT open_close_reporting FROM site_user WHERE site_id = $1 AND id = $2",
            &[&site, &user],
        )
        .await?
        .ok_or_else(|| {
            StoreError::PermissionDenied(format!("acting user {name} does not exist"))
        })?;
    let authorities = user_authorities_in_txn(tx, site, user).await?;
    let who = rules::Actor::User { name, authorities };
    who.check_acting_partition(actor.acting_partition)
        .map_err(denied)?;
    Ok((
        who,
        Some(ActingUser {
            id: user,
            open_close_reporting: row.get(0),
        }),
    ))
}

/// A user with their levels (from `site_user u`), so a page of users is one query.
pub(crate) const USER_COLUMNS: &str = "u.site_id, u.id, u.display_name, u.version, u.create_time, u.update_time,
    u.open_close_reporting,
    ARRAY(SELECT a.partition FROM user_authority a WHERE a.site_id = u.site_id AND a.user_id = u.id ORDER BY a.partition),
    ARRAY(SELECT a.level FROM user_authority a WHERE a.site_id = u.site_id AND a.user_id = u.id ORDER BY a.partition),
    u.system";

pub(crate) fn user_from_row(row: &Row) -> User {
    let partitions: Vec<i16> = row.get(7);
    let levels: Vec<i16> = row.get(8);
    User {
        site: row.get(0),
        id: row.get(1),
        display_name: row.get(2),
        version: row.get(3),
        create_time: row.get(4),
        update_time: row.get(5),
        open_close_reporting: row.get(6),
        system: row.get(9),
        authorities: partitions
            .iter()
            .zip(&levels)
            .filter_map(|(p, l)| {
                Some((
                    u8::try_from(*p).ok()?,
                    keyplane_core::authority::Level::from_number(i32::from(*l))?,
                ))
            })
            .collect(),
    }
}

pub(crate) async fn user_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
) -> Result<User, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM site_user u WHERE u.site_id = $1 AND u.id = $2"),
            &[&site, &user],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))?;
    let found = user_from_row(&row);
    if found.system {
        return Err(StoreError::NotFound(format!(
            "user sites/{site}/users/{user}"
        )));
    }
    Ok(found)
}

impl Store {
    /// Checks the acting user and partition a call names, before the call runs: a
    /// user of one of the dealer's sites, acting from a partition in which they hold
    /// a level. Writes that load their site with the acting user's rows check the
    /// same inside their own transaction and need not call this.
    pub async fn actor_check(&self, actor: &Actor) -> Result<(), StoreError> {
        if actor.acting_user.is_none() {
            return Ok(());
        }
        in_txn!(self, "actor_check", |tx| {
            if let Some((site, _)) = actor.acting_user {
                crate::site::site_get_in_txn(&tx, actor.dealer, site).await?;
                actor_resolve_in_txn(&tx, actor, site).await?;
            }
            Ok(())
        })
    }
}

/// Checks the acting user and partition a write names, from the rows its load read
/// (`partitions` and `users` of `site`), with the rules and messages of
/// [`Store::actor_check`], so a write needs no transaction of its own for it. A user
/// of another site is never allowed to write here; only that refusal reads that
/// site, with the reads `actor_check` makes.
pub(crate) async fn actor_precheck_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    partitions: &BTreeSet<u8>,
    users: &HashMap<Uuid, UserFacts>,
) -> Result<(), StoreError> {
    let Some((user_site, _)) = actor.acting_user else {
        return Ok(());
    };
    if user_site == site {
        actor_from_loaded(actor, site, partitions, users)?;
    } else {
        crate::site::site_get_in_txn(tx, actor.dealer, user_site).await?;
        actor_resolve_in_txn(tx, actor, user_site).await?;
    }
    Ok(())
}

/// A site user as the rules see them.
#[derive(Debug, Clone)]
pub(crate) struct UserFacts {
    pub open_close_reporting: bool,
    pub authorities: Authorities,
    /// keyplane's own user (the backup pool), hidden from the user API.
    pub system: bool,
}

/// Users (site, ids) with their levels, one row each: id, open/close reporting,
/// partitions, levels, system.
pub(crate) const USER_FACTS_SQL: &str = "SELECT u.id, u.open_close_reporting,
        COALESCE(array_agg(a.partition) FILTER (WHERE a.partition IS NOT NULL), '{}'),
        COALESCE(array_agg(a.level) FILTER (WHERE a.partition IS NOT NULL), '{}'),
        u.system
     FROM site_user u LEFT JOIN user_authority a ON a.site_id = u.site_id AND a.user_id = u.id
     WHERE u.site_id = $1 AND u.id = ANY($2)
     GROUP BY u.id, u.open_close_reporting, u.system";

/// Rows of [`USER_FACTS_SQL`] by user id.
pub(crate) fn user_facts(rows: &[tokio_postgres::Row]) -> HashMap<Uuid, UserFacts> {
    rows.iter()
        .map(|r| {
            let partitions: Vec<i16> = r.get(2);
            let levels: Vec<i16> = r.get(3);
            let authorities = partitions
                .iter()
                .zip(&levels)
                .filter_map(|(p, l)| {
                    Some((u8::try_from(*p).ok()?, Level::from_number(i32::from(*l))?))
                })
                .collect();
            (
                r.get(0),
                UserFacts {
                    open_close_reporting: r.get(1),
                    authorities,
                    system: r.get(4),
                },
            )
        })
        .collect()
}

/// Who acts on `site`, decided from loaded rows with the same rules and messages as
/// [`actor_resolve_in_txn`]: `partitions` are the site's, `users` hold the acting user
/// when one acts.
pub(crate) fn actor_from_loaded(
    actor: &Actor,
    site: Uuid,
    partitions: &BTreeSet<u8>,
    users: &HashMap<Uuid, UserFacts>,
) -> Result<(rules::Actor, Option<ActingUser>), StoreError> {
    let Some((user_site, user)) = actor.acting_user else {
        if let Some(p) = actor.acting_partition
            && !partitions.contains(&p)
        {
            return Err(StoreError::InvalidArgument(format!(
                "{ACTING_PARTITION_HEADER} names partition {p}, which sites/{site} does not have"
            )));
        }
        return Ok((rules::Actor::Dealer, None));
    };
    let name = format!("sites/{user_site}/users/{user}");
    if user_site != site {
        return Err(StoreError::PermissionDenied(format!(
            "acting user {name} is not a user of sites/{site}"
        )));
    }
    let facts = users.get(&user).ok_or_else(|| {
        StoreError::PermissionDenied(format!("acting user {name} does not exist"))
    })?;
    let who = rules::Actor::User {
        name,
        authorities: facts.authorities.clone(),
    };
    who.check_acting_partition(actor.acting_partition)
        .map_err(denied)?;
    Ok((
        who,
        Some(ActingUser {
            id: user,
            open_close_reporting: facts.open_close_reporting,
        }),
    ))
}
