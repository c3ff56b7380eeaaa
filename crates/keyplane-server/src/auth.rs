//! Bearer-token authentication of dealers and agents.

use crate::error::store_status;
use keyplane_store::{Actor, Store};
use tonic::{Request, Status};
use uuid::Uuid;

fn bearer<T>(request: &Request<T>, who: &str) -> Result<String, Status> {
    let value = request.metadata().get("authorization").ok_or_else(|| {
        Status::unauthenticated(format!(
            "missing authorization metadata: send `authorization: Bearer <{who} token>`"
        ))
    })?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not valid text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("authorization metadata must be `Bearer <token>`")
        })?;
    Ok(token.to_owned())
}

/// Authenticates a dealer call; returns who acts, for scoping and the audit log.
pub async fn dealer<T>(store: &Store, request: &Request<T>) -> Result<Actor, Status> {
    let token = bearer(request, "dealer")?;
    let dealer = store
        .dealer_token_authenticate(&token)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::unauthenticated("unknown or revoked dealer token"))?;
    Ok(Actor {
        dealer,
        principal: format!("dealer:{dealer}"),
        peer: request.remote_addr().map(|a| a.to_string()),
    })
}

/// Authenticates an agent; returns its site.
pub async fn agent<T>(store: &Store, request: &Request<T>) -> Result<Uuid, Status> {
    let token = bearer(request, "agent")?;
    store
        .agent_token_authenticate(&token)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::unauthenticated("unknown or revoked agent token"))
}
