//! Agent identity: the CA key every replica must use, one-time enrollment codes,
//! enrolled agents (recognized by their certificate's SHA-256), revocation, and the
//! per-site session epoch that tells live streams to re-check who they serve.

use crate::Cached;
use crate::crypto::{new_token, token_hash};
use crate::site::{AuditParams, site_load_in_txn};
use crate::{Actor, Store, StoreError, batch_in_txn, in_txn, params};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// Who an agent connection authenticated as.
#[derive(Clone, PartialEq, Eq)]
pub enum AgentPrincipal {
    /// An enrolled agent (client certificate).
    Agent(Uuid),
    /// A bearer agent token, by its hash.
    Token(Vec<u8>),
}

impl std::fmt::Debug for AgentPrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentPrincipal::Agent(id) => write!(f, "agents/{id}"),
            AgentPrincipal::Token(_) => f.write_str("agent token"),
        }
    }
}

/// Whether a live agent session may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// It may; the site's session epoch is this.
    Current {
        /// The epoch read.
        epoch: i64,
        /// When the agent's current certificate expires (None for a token): the
        /// next time the stream must check again without being told to.
        not_after: Option<SystemTime>,
    },
    /// Another session for the site opened since.
    Replaced,
    /// An operator closed it (OpsService/CloseAgentConnection).
    Closed,
    /// Its certificate or token was revoked (or the agent re-enrolled).
    Revoked,
    /// The site was deleted.
    SiteGone,
}

/// A new enrollment code, shown once.
#[derive(Clone)]
pub struct EnrollmentCode {
    /// The code (`kpe_…`).
    pub code: String,
    /// When it stops working.
    pub expire_time: SystemTime,
}

impl std::fmt::Debug for EnrollmentCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentCode")
            .field("expire_time", &self.expire_time)
            .finish_non_exhaustive()
    }
}

/// Longest an enrollment code may live.
pub const ENROLLMENT_CODE_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl Store {
    /// Like [`Store::key_check`] for the agent CA: the first replica started with a
    /// CA records its key id; a replica with another CA key, or with none once one
    /// is recorded, is refused, naming the recorded id.
    pub async fn ca_check(&self, mine: Option<&str>) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        if let Some(mine) = mine {
            conn.execute(
                "INSERT INTO ca_key_in_use (key_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&mine],
            )
            .await?;
        }
        let recorded: Option<String> = conn
            .query_opt("SELECT key_id FROM ca_key_in_use", &[])
            .await?
            .map(|r| r.get(0));
        match (recorded, mine) {
            (None, _) => Ok(()),
            (Some(recorded), Some(mine)) if recorded == mine => Ok(()),
            (Some(recorded), Some(mine)) => Err(StoreError::FailedPrecondition(format!(
                "this database is keyed to agent CA key id {recorded} (recorded when the first replica started with a CA) but the configured CA key is {mine}: start keyplaned with the --ca-key-file that holds {recorded} (every replica needs the same CA key; `keyplaned ca-init` prints a new CA's id)"
            ))),
            (Some(recorded), None) => Err(StoreError::FailedPrecondition(format!(
                "this database is keyed to agent CA key id {recorded} but no CA key is configured: pass --ca-key-file with the CA key the other replicas use (enrolled agents could not renew their certificates otherwise)"
            ))),
        }
    }

    /// Issues a one-time enrollment code for `site`, valid for `ttl`.
    pub async fn enrollment_code_create(
        &self,
        actor: &Actor,
        site: Uuid,
        ttl: Duration,
    ) -> Result<EnrollmentCode, StoreError> {
        if ttl.is_zero() || ttl > ENROLLMENT_CODE_MAX_TTL {
            return Err(StoreError::InvalidArgument(format!(
                "an enrollment code lives from 1 s to {} days",
                ENROLLMENT_CODE_MAX_TTL.as_secs() / 86_400
            )));
        }
        let code = new_token("kpe_")?;
        let hash = token_hash(&code);
        let expire_time = SystemTime::now() + ttl;
        in_txn!(self, "enrollment_code_create", |tx| {
            site_load_in_txn(&tx, actor.dealer, site, None, Vec::new()).await?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "enrollment_code.create",
                &format!("sites/{site}"),
                serde_json::json!({ "ttl_seconds": ttl.as_secs() }),
            )
            .after(serde_json::json!({
                "enrollment_code": {
                    "expire_time": chrono::DateTime::<chrono::Utc>::from(expire_time),
                },
            }));
            batch_in_txn(
                &tx,
                &[
                    (
                        "INSERT INTO enrollment_code (code_hash, site_id, expire_time) VALUES ($1, $2, $3)",
                        params![&hash, &site, &expire_time],
                    ),
                    audit.step(),
                ],
            )
            .await?;
            Ok(())
        })?;
        Ok(EnrollmentCode { code, expire_time })
    }

    /// The site an unused, unexpired enrollment code is for (it stays unused).
    pub async fn enrollment_code_site(&self, code: &str) -> Result<Option<Uuid>, StoreError> {
        let conn = self.conn().await?;
        Ok(conn
            .query_opt(
                "SELECT site_id FROM enrollment_code WHERE code_hash = $1 AND expire_time > now()",
                &[&token_hash(code)],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Uses up `code` and records `agent` with its certificate for the code's site.
    /// The site's earlier agents are revoked (one agent per site) and its live
    /// sessions told to re-check. Returns the site; None when the code is unknown,
    /// used or expired.
    pub async fn agent_enroll(
        &self,
        code: &str,
        agent: Uuid,
        cert_sha256: &[u8],
        not_after: SystemTime,
    ) -> Result<Option<Uuid>, StoreError> {
        let hash = token_hash(code);
        in_txn!(self, "agent_enroll", |tx| {
            let Some(row) = tx
                .query_opt(
                    "DELETE FROM enrollment_code WHERE code_hash = $1 AND expire_time > now() RETURNING site_id",
                    &[&hash],
                )
                .await?
            else {
                return Ok(None);
            };
            let site: Uuid = row.get(0);
            batch_in_txn(
                &tx,
                &[
                    (
                        "UPDATE agent SET revoke_time = now() WHERE site_id = $1 AND revoke_time IS NULL",
                        params![&site],
                    ),
                    (
                        "INSERT INTO agent (id, site_id, cert_sha256, not_after) VALUES ($1, $2, $3, $4)",
                        params![&agent, &site, &cert_sha256, &not_after],
                    ),
                    (
                        "UPDATE site SET session_epoch = session_epoch + 1 WHERE id = $1",
                        params![&site],
                    ),
                ],
            )
            .await?;
            Ok(Some(site))
        })
    }

    /// Replaces an agent's certificate (renewal): only while `old_sha256` is its
    /// current one and it is not revoked. Returns whether it was replaced.
    pub async fn agent_renew(
        &self,
        agent: Uuid,
        old_sha256: &[u8],
        new_sha256: &[u8],
        not_after: SystemTime,
    ) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE agent SET cert_sha256 = $3, not_after = $4
                 WHERE id = $1 AND cert_sha256 = $2 AND revoke_time IS NULL",
                &[&agent, &old_sha256, &new_sha256, &not_after],
            )
            .await?;
        Ok(n == 1)
    }

    /// The (agent, site, expiry) a client certificate belongs to, if it is an
    /// enrolled agent's current, unrevoked, unexpired certificate.
    pub async fn agent_cert_authenticate(
        &self,
        cert_sha256: &[u8],
    ) -> Result<Option<(Uuid, Uuid, SystemTime)>, StoreError> {
        let conn = self.conn().await?;
        Ok(conn
            .query_opt(
                "SELECT id, site_id, not_after FROM agent
                 WHERE cert_sha256 = $1 AND revoke_time IS NULL AND not_after > now()",
                &[&cert_sha256],
            )
            .await?
            .map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// Revokes every agent certificate and agent token of `site`; its live streams
    /// close on every replica within a poll. Returns how many were revoked.
    pub async fn agent_revoke(&self, actor: &Actor, site: Uuid) -> Result<u64, StoreError> {
        in_txn!(self, "agent_revoke", |tx| {
            site_load_in_txn(&tx, actor.dealer, site, None, Vec::new()).await?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "agent.revoke",
                &format!("sites/{site}"),
                serde_json::json!({}),
            );
            let after = Some(serde_json::json!({ "agent_tokens": 0, "agents": 0 }));
            let rows = batch_in_txn(
                &tx,
                &[
                    audit.step_in(crate::auth::AGENT_TOKENS_AUDIT_SQL, params![&after]),
                    (
                        "UPDATE agent SET revoke_time = now() WHERE site_id = $1 AND revoke_time IS NULL RETURNING id",
                        params![&site],
                    ),
                    (
                        "DELETE FROM agent_token WHERE site_id = $1 RETURNING site_id",
                        params![&site],
                    ),
                    (
                        "UPDATE site SET session_epoch = session_epoch + 1 WHERE id = $1",
                        params![&site],
                    ),
                ],
            )
            .await?;
            let n = rows.iter().skip(1).take(2).map(|r| r.len() as u64).sum();
            Ok(n)
        })
    }

    /// Whether the session `session` of `site`, opened by `principal`, may go on.
    pub async fn agent_session_check(
        &self,
        site: Uuid,
        session: Uuid,
        principal: &AgentPrincipal,
    ) -> Result<SessionCheck, StoreError> {
        let conn = self.conn().await?;
        let (agent, token): (Option<Uuid>, Option<&[u8]>) = match principal {
            AgentPrincipal::Agent(id) => (Some(*id), None),
            AgentPrincipal::Token(hash) => (None, Some(hash.as_slice())),
        };
        let Some(row) = conn
            .query_opt(
                "SELECT s.agent_session, s.session_epoch,
                    CASE WHEN $2::uuid IS NOT NULL THEN
                        EXISTS (SELECT 1 FROM agent a WHERE a.id = $2 AND a.site_id = s.id
                                 AND a.revoke_time IS NULL AND a.not_after > now())
                    ELSE
                        EXISTS (SELECT 1 FROM agent_token t WHERE t.token_hash = $3 AND t.site_id = s.id)
                    END,
                    (SELECT a.not_after FROM agent a WHERE a.site_id = s.id AND a.id = $2),
                    s.agent_closed_session
                 FROM site s WHERE s.id = $1",
                &[&site, &agent, &token],
            )
            .await?
        else {
            return Ok(SessionCheck::SiteGone);
        };
        let current: Option<Uuid> = row.get(0);
        let valid: bool = row.get(2);
        Ok(if !valid {
            SessionCheck::Revoked
        } else if current.is_none() && row.get::<_, Option<Uuid>>(4) == Some(session) {
            SessionCheck::Closed
        } else if current != Some(session) {
            SessionCheck::Replaced
        } else {
            SessionCheck::Current {
                epoch: row.get(1),
                not_after: row.get(3),
            }
        })
    }
}
