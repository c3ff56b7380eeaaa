//! Dealers, dealer tokens and agent tokens.

use crate::crypto::{new_token, token_hash};
use crate::site::site_get_in_txn;
use crate::{Actor, Store, StoreError, in_txn};
use uuid::Uuid;

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

    /// The dealer a bearer token belongs to, if any.
    pub async fn dealer_token_authenticate(&self, token: &str) -> Result<Option<Uuid>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT dealer_id FROM dealer_token WHERE token_hash = $1",
                &[&token_hash(token)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Issues a new agent token for a site, revoking the earlier ones.
    pub async fn agent_token_issue(&self, actor: &Actor, site: Uuid) -> Result<String, StoreError> {
        let token = new_token("kpa_")?;
        let hash = token_hash(&token);
        in_txn!(self, "agent_token_issue", |tx| {
            site_get_in_txn(&tx, actor.dealer, site).await?;
            tx.execute("DELETE FROM agent_token WHERE site_id = $1", &[&site])
                .await?;
            tx.execute(
                "INSERT INTO agent_token (token_hash, site_id) VALUES ($1, $2)",
                &[&hash, &site],
            )
            .await?;
            crate::site::audit_in_txn(
                &tx,
                actor,
                Some(site),
                "agent_token.issue",
                &format!("sites/{site}"),
                serde_json::json!({}),
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
