//! Dealers, dealer tokens and agent tokens.

use crate::Cached;
use crate::crypto::{new_token, token_hash};
use crate::site::{AuditParams, site_load_in_txn};
use crate::{Actor, Store, StoreError, batch_in_txn, in_txn, params};
use keyplane_core::scope::TokenScope;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use uuid::Uuid;

/// How long a dealer token, once found in the database, is trusted without asking it
/// again: a token removed from `dealer_token` stops working on every replica within
/// this bound.
pub const DEALER_TOKEN_TTL: Duration = Duration::from_secs(1);

/// Most tokens remembered; past it the cache starts over (only valid tokens are kept,
/// so guessing cannot fill it).
const TOKEN_CACHE_MAX: usize = 10_000;

/// A verified dealer token: whose it is and what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DealerToken {
    /// The dealer.
    pub dealer: Uuid,
    /// The token's id (`dealerTokens/{id}`).
    pub id: Uuid,
    /// What it may call.
    pub scope: TokenScope,
}

/// A dealer token as listed (never the token itself).
#[derive(Debug, Clone)]
pub struct DealerTokenInfo {
    /// The token's id.
    pub id: Uuid,
    /// A label.
    pub display_name: String,
    /// What it may call.
    pub scope: TokenScope,
    /// When it stops working, if ever.
    pub expire_time: Option<SystemTime>,
    /// When it was made.
    pub create_time: SystemTime,
}

/// Dealer tokens verified in the last `ttl` (and not past their expiry), by hash.
#[derive(Debug)]
pub(crate) struct TokenCache {
    ttl: Duration,
    map: Mutex<HashMap<Vec<u8>, Verified>>,
}

/// A verified token, when it was verified, and when it expires.
type Verified = (DealerToken, Instant, Option<SystemTime>);

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

    fn get(&self, hash: &[u8]) -> Option<DealerToken> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(hash)
            .filter(|(_, at, expire)| {
                at.elapsed() < self.ttl && expire.is_none_or(|e| SystemTime::now() < e)
            })
            .map(|(token, _, _)| *token)
    }

    fn put(&self, hash: Vec<u8>, token: DealerToken, expire: Option<SystemTime>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= TOKEN_CACHE_MAX {
            let ttl = self.ttl;
            map.retain(|_, (_, at, _)| at.elapsed() < ttl);
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (token, Instant::now(), expire));
    }
}

/// Creates dealer token `$11` of dealer `$1` (hash `$10`, scope `$12`, expiry `$13`,
/// name `$14`) and its audit row, the token as created (never its hash) after.
const DEALER_TOKEN_CREATE_SQL: &str = "WITH t AS (
        INSERT INTO dealer_token (token_hash, dealer_id, id, scope, expire_time, display_name)
        VALUES ($10, $1, $11, $12, $13, $14) RETURNING display_name, scope, expire_time
     )
     INSERT INTO dealer_audit_log
        (dealer_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $3, $4, $5, $6, $7, $8, $9, NULL,
        jsonb_build_object('display_name', t.display_name, 'scope', t.scope, 'expire_time', t.expire_time)
     FROM t WHERE $2::uuid IS NULL";

/// Deletes dealer token `$10` of dealer `$1` and writes its audit row, the token as it
/// was (never its hash) before; no row when there was no such token.
const DEALER_TOKEN_REVOKE_SQL: &str = "WITH t AS (
        DELETE FROM dealer_token WHERE id = $10 AND dealer_id = $1
        RETURNING display_name, scope, expire_time
     )
     INSERT INTO dealer_audit_log
        (dealer_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $3, $4, $5, $6, $7, $8, $9,
        jsonb_build_object('display_name', t.display_name, 'scope', t.scope, 'expire_time', t.expire_time),
        NULL
     FROM t WHERE $2::uuid IS NULL RETURNING position";

/// An audit row for a change of site `$2`'s agent credentials: before, how many agent
/// certificates and tokens are live (read by the statement: run it before the
/// write); after, `$10`. Never a token or a certificate.
pub(crate) const AGENT_TOKENS_AUDIT_SQL: &str = "INSERT INTO audit_log
        (dealer_id, site_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9,
        jsonb_build_object(
            'agent_tokens', (SELECT count(*) FROM agent_token WHERE site_id = $2),
            'agents', (SELECT count(*) FROM agent WHERE site_id = $2 AND revoke_time IS NULL)),
        $10";

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
                "INSERT INTO dealer_audit_log (dealer_id, actor, action, resource, after)
                 VALUES ($1, 'bootstrap', 'dealer.create', $2, jsonb_build_object('display_name', $3::text))",
                &[&id, &format!("dealers/{id}"), &display_name],
            )
            .await?;
            Ok(id)
        })?;
        Ok((id, token))
    }

    /// The dealer token a bearer token is, if it exists and has not expired. A token
    /// found in the database is trusted for [`DEALER_TOKEN_TTL`] (never past its
    /// expiry) without asking again: a revoked token stops within that bound. An
    /// unknown one is asked about every time.
    pub async fn dealer_token_authenticate(
        &self,
        token: &str,
    ) -> Result<Option<DealerToken>, StoreError> {
        let hash = token_hash(token);
        if let Some(found) = self.tokens.get(&hash) {
            return Ok(Some(found));
        }
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT dealer_id, id, scope, expire_time FROM dealer_token
                 WHERE token_hash = $1 AND (expire_time IS NULL OR expire_time > now())",
                &[&hash],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let scope: String = row.get(2);
        let found = DealerToken {
            dealer: row.get(0),
            id: row.get(1),
            scope: TokenScope::parse(&scope)
                .ok_or_else(|| StoreError::Internal(format!("dealer token scope {scope}")))?,
        };
        self.tokens.put(hash, found, row.get(3));
        Ok(Some(found))
    }

    /// Creates a dealer token for the acting dealer (returned once, stored hashed).
    pub async fn dealer_token_create(
        &self,
        actor: &Actor,
        display_name: &str,
        scope: TokenScope,
        ttl: Option<Duration>,
    ) -> Result<(Uuid, String, Option<SystemTime>), StoreError> {
        let token = new_token("kpd_")?;
        let hash = token_hash(&token);
        let expire_time = ttl.map(|t| SystemTime::now() + t);
        let id = Uuid::new_v4();
        in_txn!(self, "dealer_token_create", |tx| {
            let audit = AuditParams::new(
                actor,
                None,
                "dealer_token.create",
                &format!("dealerTokens/{id}"),
                serde_json::json!({ "scope": scope.as_str() }),
            );
            batch_in_txn(
                &tx,
                &[audit.step_in(
                    DEALER_TOKEN_CREATE_SQL,
                    params![&hash, &id, &scope.as_str(), &expire_time, &display_name],
                )],
            )
            .await?;
            Ok(())
        })?;
        Ok((id, token, expire_time))
    }

    /// The acting dealer's tokens (never the tokens themselves).
    pub async fn dealer_token_list(
        &self,
        dealer: Uuid,
    ) -> Result<Vec<DealerTokenInfo>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, display_name, scope, expire_time, create_time FROM dealer_token
                 WHERE dealer_id = $1 ORDER BY create_time, id",
                &[&dealer],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let scope: String = r.get(2);
                Ok(DealerTokenInfo {
                    id: r.get(0),
                    display_name: r.get(1),
                    scope: TokenScope::parse(&scope).ok_or_else(|| {
                        StoreError::Internal(format!("dealer token scope {scope}"))
                    })?,
                    expire_time: r.get(3),
                    create_time: r.get(4),
                })
            })
            .collect()
    }

    /// Revokes one of the acting dealer's tokens; it stops working on every replica
    /// within [`DEALER_TOKEN_TTL`].
    pub async fn dealer_token_revoke(&self, actor: &Actor, id: Uuid) -> Result<(), StoreError> {
        in_txn!(self, "dealer_token_revoke", |tx| {
            let audit = AuditParams::new(
                actor,
                None,
                "dealer_token.revoke",
                &format!("dealerTokens/{id}"),
                serde_json::json!({}),
            );
            let rows =
                batch_in_txn(&tx, &[audit.step_in(DEALER_TOKEN_REVOKE_SQL, params![&id])]).await?;
            if rows.first().is_none_or(|r| r.is_empty()) {
                return Err(StoreError::NotFound(format!("dealerTokens/{id}")));
            }
            Ok(())
        })
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
            let after = Some(serde_json::json!({ "agent_tokens": 1 }));
            batch_in_txn(
                &tx,
                &[
                    audit.step_in(AGENT_TOKENS_AUDIT_SQL, params![&after]),
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
