//! Dealers, dealer tokens and agent tokens.

use crate::Cached;
use crate::crypto::{new_token, token_hash};
use crate::site::{AuditParams, site_load_in_txn};
use crate::{Actor, Store, StoreError, batch_in_txn, in_txn, params};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a dealer token, once found in the database, is trusted without asking it
/// again: a token removed from `dealer_token` stops working on every replica within
/// this bound.
pub const DEALER_TOKEN_TTL: Duration = Duration::from_secs(1);

/// Most tokens remembered; past it the cache starts over (only valid tokens are kept,
/// so guessing cannot fill it).
const TOKEN_CACHE_MAX: usize = 10_000;

/// Dealer tokens verified in the last `ttl`, by token hash.
#[derive(Debug)]
pub(crate) struct TokenCache {
    ttl: Duration,
    map: Mutex<HashMap<Vec<u8>, (Uuid, Instant)>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new(DEALER_TOKEN_TTL)
    }
}

impl TokenCache {
    pub(crate) fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            map: Mutex::default(),
        }
    }

    fn get(&self, hash: &[u8]) -> Option<Uuid> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(dealer, _)| *dealer)
    }

    fn put(&self, hash: Vec<u8>, dealer: Uuid) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= TOKEN_CACHE_MAX {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (dealer, Instant::now()));
    }
}

impl Store {
    /// Creates a dealer and its first bearer token (returned once, stored hashed).
    pub async fn dealer_create(&self, display_name: &str) -> Result<(Uuid, String), StoreError> {
        let token = new_token("kpd_")?;
        let hash = token_hash(&token);
        let id = in_txn!(self, "dealer_create", |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO dealer (display_name) VALUES ($1) RETURNING id",
                    &[&display_name],
                )
                .await?;
            let id: Uuid = row.get(0);
            tx.execute(
                "INSERT INTO dealer_token (token_hash, dealer_id) VALUES ($1, $2)",
                &[&hash, &id],
            )
            .await?;
            tx.execute(
                "INSERT INTO audit_log (dealer_id, actor, action, resource) VALUES ($1, 'bootstrap', 'dealer.create', $2)",
                &[&id, &format!("dealers/{id}")],
            )
            .await?;
            Ok(id)
        })?;
        Ok((id, token))
    }

    /// The dealer a bearer token belongs to, if any. A token found in the database is
    /// trusted for [`DEALER_TOKEN_TTL`] without asking again; an unknown one is asked
    /// about every time.
    pub async fn dealer_token_authenticate(&self, token: &str) -> Result<Option<Uuid>, StoreError> {
        let hash = token_hash(token);
        if let Some(dealer) = self.tokens.get(&hash) {
            return Ok(Some(dealer));
        }
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT dealer_id FROM dealer_token WHERE token_hash = $1",
                &[&hash],
            )
            .await?;
        let dealer: Option<Uuid> = row.map(|r| r.get(0));
        if let Some(dealer) = dealer {
            self.tokens.put(hash, dealer);
        }
        Ok(dealer)
    }

    /// Issues a new agent token for a site, revoking the earlier ones.
    pub async fn agent_token_issue(&self, actor: &Actor, site: Uuid) -> Result<String, StoreError> {
        let token = new_token("kpa_")?;
        let hash = token_hash(&token);
        in_txn!(self, "agent_token_issue", |tx| {
            site_load_in_txn(&tx, actor.dealer, site, None, Vec::new()).await?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "agent_token.issue",
                &format!("sites/{site}"),
                serde_json::json!({}),
            );
            batch_in_txn(
                &tx,
                &[
                    ("DELETE FROM agent_token WHERE site_id = $1", params![&site]),
                    (
                        "INSERT INTO agent_token (token_hash, site_id) VALUES ($1, $2)",
                        params![&hash, &site],
                    ),
                    // Streams opened with the revoked tokens re-check and end.
                    (
                        "UPDATE site SET session_epoch = session_epoch + 1 WHERE id = $1",
                        params![&site],
                    ),
                    audit.step(),
                ],
            )
            .await?;
            Ok(())
        })?;
        Ok(token)
    }

    /// The site an agent token belongs to, if any.
    pub async fn agent_token_authenticate(&self, token: &str) -> Result<Option<Uuid>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT site_id FROM agent_token WHERE token_hash = $1",
                &[&token_hash(token)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
