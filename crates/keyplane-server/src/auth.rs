//! Bearer-token authentication of dealers and agents.

use crate::error::store_status;
use keyplane_core::names::{MAX_PARTITIONS, UserName};
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

/// Whether the store call behind a request of type `T` checks the acting user and
/// partition inside its own transaction, from the rows it loads anyway (the writes
/// of codes, users, personal plans, local codes and drift): those need no separate
/// check first.
fn store_checks_actor<T: 'static>() -> bool {
    use keyplane_proto::v1 as pb;
    use std::any::TypeId;
    [
        TypeId::of::<pb::CreateCredentialRequest>(),
        TypeId::of::<pb::UpdateCredentialRequest>(),
        TypeId::of::<pb::DeleteCredentialRequest>(),
        TypeId::of::<pb::CreateUserRequest>(),
        TypeId::of::<pb::UpdateUserRequest>(),
        TypeId::of::<pb::DeleteUserRequest>(),
        TypeId::of::<pb::UpdatePersonalAccessPlanRequest>(),
        TypeId::of::<pb::ClearPersonalAccessPlanRequest>(),
        TypeId::of::<pb::ClaimLocalCodeRequest>(),
        TypeId::of::<pb::RemoveLocalCodeRequest>(),
        TypeId::of::<pb::ResolveDriftRequest>(),
    ]
    .contains(&TypeId::of::<T>())
}

/// Authenticates a dealer call; returns who acts, for scoping and the audit log.
pub async fn dealer<T: 'static>(store: &Store, request: &Request<T>) -> Result<Actor, Status> {
    let token = bearer(request, "dealer")?;
    let dealer = store
        .dealer_token_authenticate(&token)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::unauthenticated("unknown or revoked dealer token"))?;
    let acting_user = match header(request, ACTING_USER)? {
        None => None,
        Some(name) => {
            let user = UserName::parse(&name)
                .map_err(|e| Status::invalid_argument(format!("{ACTING_USER} header: {e}")))?;
            Some((user.site, user.user))
        }
    };
    let acting_partition = match header(request, ACTING_PARTITION)? {
        None => None,
        Some(p) => Some(
            p.parse::<u8>()
                .ok()
                .filter(|n| (1..=MAX_PARTITIONS).contains(n))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{ACTING_PARTITION} header must be 1..{MAX_PARTITIONS}"
                    ))
                })?,
        ),
    };
    let principal = match acting_user {
        Some((site, user)) => format!("dealer:{dealer} as sites/{site}/users/{user}"),
        None => format!("dealer:{dealer}"),
    };
    let actor = Actor {
        dealer,
        principal,
        peer: request.remote_addr().map(|a| a.to_string()),
        acting_user,
        acting_partition,
    };
    // Every call, whether or not it uses the acting user's levels, refuses a user
    // claiming to act from a partition they do not hold: here, or in the store's load.
    if !store_checks_actor::<T>() {
        store.actor_check(&actor).await.map_err(store_status)?;
    }
    Ok(actor)
}

/// Metadata naming the site user who acts through the back office.
pub const ACTING_USER: &str = "keyplane-acting-user";
/// Metadata naming the partition the actor acts from.
pub const ACTING_PARTITION: &str = keyplane_core::authority::ACTING_PARTITION_HEADER;

fn header<T>(request: &Request<T>, name: &str) -> Result<Option<String>, Status> {
    request
        .metadata()
        .get(name)
        .map(|v| {
            v.to_str()
                .map(|s| s.trim().to_owned())
                .map_err(|_| Status::invalid_argument(format!("{name} header is not valid text")))
        })
        .transpose()
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
