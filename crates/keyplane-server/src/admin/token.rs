//! Dealer tokens: create (scoped, optionally expiring), list, revoke.

use super::*;
use keyplane_core::names::DealerTokenName;
use keyplane_core::scope::TokenScope;
use keyplane_store::DealerTokenInfo;

fn scope_pb(scope: TokenScope) -> pb::TokenScope {
    match scope {
        TokenScope::Admin => pb::TokenScope::Admin,
        TokenScope::Ops => pb::TokenScope::Ops,
        TokenScope::ReadOnly => pb::TokenScope::ReadOnly,
    }
}

fn token_pb(t: &DealerTokenInfo) -> pb::DealerToken {
    pb::DealerToken {
        name: DealerTokenName { token: t.id }.to_string(),
        display_name: t.display_name.clone(),
        scope: scope_pb(t.scope) as i32,
        expire_time: t.expire_time.map(prost_types::Timestamp::from),
        create_time: Some(prost_types::Timestamp::from(t.create_time)),
    }
}

fn token_id(name: &str) -> Result<Uuid, Status> {
    DealerTokenName::parse(name)
        .map(|n| n.token)
        .map_err(|_| Status::invalid_argument("name must be dealerTokens/{id}"))
}

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateDealerTokenRequest>,
) -> Res<pb::CreateDealerTokenResponse> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "creating a dealer token")?;
    let scope = match pb::TokenScope::try_from(req.scope) {
        Ok(pb::TokenScope::Admin) => TokenScope::Admin,
        Ok(pb::TokenScope::Ops) => TokenScope::Ops,
        Ok(pb::TokenScope::ReadOnly) => TokenScope::ReadOnly,
        _ => {
            return Err(Status::invalid_argument(
                "scope is required: TOKEN_SCOPE_ADMIN, TOKEN_SCOPE_OPS or TOKEN_SCOPE_READ_ONLY",
            ));
        }
    };
    let ttl = match req.ttl_seconds {
        0 => None,
        n if n > 0 => Some(std::time::Duration::from_secs(n.unsigned_abs())),
        _ => return Err(Status::invalid_argument("ttl_seconds must not be negative")),
    };
    let (id, token, expire_time) = api
        .store
        .dealer_token_create(&actor, req.display_name.trim(), scope, ttl)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::CreateDealerTokenResponse {
        dealer_token: Some(token_pb(&DealerTokenInfo {
            id,
            display_name: req.display_name.trim().to_owned(),
            scope,
            expire_time,
            create_time: std::time::SystemTime::now(),
        })),
        token,
    }))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListDealerTokensRequest>,
) -> Res<pb::ListDealerTokensResponse> {
    let (actor, _) = dealer_call(request)?;
    let tokens = api
        .store
        .dealer_token_list(actor.dealer)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListDealerTokensResponse {
        dealer_tokens: tokens.iter().map(token_pb).collect(),
    }))
}

pub(super) async fn revoke(
    api: &AdminApi,
    request: Request<pb::RevokeDealerTokenRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "revoking a dealer token")?;
    let id = token_id(&req.name)?;
    api.store
        .dealer_token_revoke(&actor, id)
        .await
        .map_err(store_status)?;
    Ok(Response::new(()))
}
