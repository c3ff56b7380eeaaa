//! Loading who acts and what levels users hold, for the rules in
//! `keyplane_core::authority`. Checks run inside the write's transaction, so the
//! levels they see are the ones the write commits against.

use crate::{Actor, StoreError};
use keyplane_core::authority::{self as rules, Authorities, AuthorityError, Level};
use tokio_postgres::Transaction;
use uuid::Uuid;

/// The acting site user, when one acts.
#[derive(Debug, Clone)]
pub(crate) struct ActingUser {
    pub id: Uuid,
    pub open_close_reporting: bool,
}

pub(crate) fn denied(e: AuthorityError) -> StoreError {
    StoreError::PermissionDenied(e.to_string())
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

/// Replaces the levels of `user`.
pub(crate) async fn user_authorities_write_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
    authorities: &Authorities,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM user_authority WHERE site_id = $1 AND user_id = $2",
        &[&site, &user],
    )
    .await?;
    for (&partition, &level) in authorities {
        crate::partition::partition_get_in_txn(tx, site, partition).await?;
        let level = i16::try_from(level.number()).unwrap_or(i16::MAX);
        tx.execute(
            "INSERT INTO user_authority (site_id, user_id, partition, level) VALUES ($1, $2, $3, $4)",
            &[&site, &user, &i16::from(partition), &level],
        )
        .await?;
    }
    Ok(())
}

/// Who acts on `site`: the dealer, or a user of that site with their levels.
pub(crate) async fn actor_resolve_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
) -> Result<(rules::Actor, Option<ActingUser>), StoreError> {
    let Some((user_site, user)) = actor.acting_user else {
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
    Ok((
        rules::Actor::User { name, authorities },
        Some(ActingUser {
            id: user,
            open_close_reporting: row.get(0),
        }),
    ))
}

/// The partition the actor changes a code from: the one named in the request, else
/// a user's only partition; None for the dealer when none is named.
pub(crate) fn acting_partition(
    actor: &Actor,
    resolved: &rules::Actor,
) -> Result<Option<u8>, StoreError> {
    if let Some(p) = actor.acting_partition {
        return Ok(Some(p));
    }
    match resolved {
        rules::Actor::Dealer => Ok(None),
        rules::Actor::User { authorities, .. } if authorities.len() == 1 => {
            Ok(authorities.keys().next().copied())
        }
        rules::Actor::User { name, .. } => Err(StoreError::FailedPrecondition(format!(
            "user {name} holds several partitions: name the one you act from with the keyplane-acting-partition header"
        ))),
    }
}
