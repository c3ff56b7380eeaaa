//! Authentication of dealers (bearer tokens with scopes) and agents (client
//! certificates, or bearer agent tokens until every agent has enrolled).
//!
//! Dealers are authenticated once per call by [`DealerAuthLayer`], a tower layer in
//! front of AdminService and OpsService (one layer, cloned, so both share the
//! failure limiter): it verifies `authorization: Bearer <token>` through the
//! store's cached verification (a token is trusted at most `dealer_token_ttl`
//! without the database, never past its expiry), refuses methods outside the token's
//! scope (`keyplane_core::scope`), limits failed authentications per peer address
//! ([`FailureLimiter`]), reads the acting-user headers, and puts the [`Actor`] into
//! the request's extensions; handlers take it with [`actor`]. A refused call never
//! reaches a handler. Agents, whose one call is a stream, are authenticated by
//! [`agent`] at the start of that call: the SHA-256 of the client certificate maps
//! to an enrolled agent and its site.

use crate::error::store_status;
use keyplane_core::names::{MAX_PARTITIONS, UserName};
use keyplane_store::{Actor, AgentPrincipal, Store};
use sha2::{Digest, Sha256};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request as HttpRequest, Response as HttpResponse};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};
use uuid::Uuid;

fn bearer(headers: &HeaderMap, who: &str) -> Result<String, Status> {
    let value = headers.get("authorization").ok_or_else(|| {
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

/// The AdminService methods whose store call checks the acting user and partition
/// inside its own transaction, from the rows it loads anyway (the writes of codes,
/// users, personal plans, local codes and drift): those need no separate check first.
const STORE_CHECKS_ACTOR: &[&str] = &[
    "CreateCredential",
    "UpdateCredential",
    "DeleteCredential",
    "CreateUser",
    "UpdateUser",
    "DeleteUser",
    "UpdatePersonalAccessPlan",
    "ClearPersonalAccessPlan",
    "ClaimLocalCode",
    "RemoveLocalCode",
    "ResolveDrift",
];

/// Whether the call to `path` (`/keyplane.v1.AdminService/<Method>`) leaves the
/// acting-user check to its store call.
fn store_checks_actor(path: &str) -> bool {
    path.strip_prefix("/keyplane.v1.AdminService/")
        .is_some_and(|method| STORE_CHECKS_ACTOR.contains(&method))
}

/// Authenticates a dealer call to `path` from its headers; returns who acts, for
/// scoping and the audit log.
pub async fn dealer(
    store: &Store,
    path: &str,
    headers: &HeaderMap,
    peer: Option<std::net::SocketAddr>,
) -> Result<Actor, Status> {
    let token = bearer(headers, "dealer")?;
    let found = store
        .dealer_token_authenticate(&token)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::unauthenticated("unknown, expired or revoked dealer token"))?;
    let method = path.rsplit_once('/').map_or(path, |(_, m)| m);
    if !found.scope.allows_path(path) {
        return Err(Status::permission_denied(format!(
            "this dealer token's scope is {}: it may not call {method}",
            found.scope.as_str()
        )));
    }
    let dealer = found.dealer;
    let acting_user = match header(headers, ACTING_USER)? {
        None => None,
        Some(name) => {
            let user = UserName::parse(&name)
                .map_err(|e| Status::invalid_argument(format!("{ACTING_USER} header: {e}")))?;
            Some((user.site, user.user))
        }
    };
    let acting_partition = match header(headers, ACTING_PARTITION)? {
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
    let request_id = match header(headers, REQUEST_ID)? {
        Some(id) if !id.is_empty() => {
            if id.len() > MAX_REQUEST_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Status::invalid_argument(format!(
                    "{REQUEST_ID} header must be 1 to {MAX_REQUEST_ID} visible ASCII characters"
                )));
            }
            id
        }
        // None given: one of our own, so every audit record names its call.
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let actor = Actor {
        dealer,
        principal,
        peer: peer.map(|a| a.to_string()),
        acting_user,
        acting_partition,
        acting_as: acting_user.map(|(site, user)| format!("sites/{site}/users/{user}")),
        request_id: Some(request_id),
    };
    // Every call, whether or not it uses the acting user's levels, refuses a user
    // claiming to act from a partition they do not hold: here, or in the store's load.
    if !store_checks_actor(path) {
        store.actor_check(&actor).await.map_err(store_status)?;
    }
    Ok(actor)
}

/// The dealer [`DealerAuthLayer`] authenticated for this call.
pub fn actor<T>(request: &Request<T>) -> Result<Actor, Status> {
    request.extensions().get::<Actor>().cloned().ok_or_else(|| {
        tracing::error!("a dealer call reached its handler without DealerAuthLayer");
        Status::internal("internal error; the server logged the details")
    })
}

/// The AdminService method a call is for (set by [`DealerAuthLayer`]).
#[derive(Debug, Clone)]
pub struct AdminMethod(pub String);

/// Metadata carrying the caller's id for this call (recorded in the audit log).
pub const REQUEST_ID: &str = "x-request-id";
/// The longest request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// Metadata naming the site user who acts through the back office.
pub const ACTING_USER: &str = "keyplane-acting-user";
/// Metadata naming the partition the actor acts from.
pub const ACTING_PARTITION: &str = keyplane_core::authority::ACTING_PARTITION_HEADER;

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, Status> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(|s| s.trim().to_owned())
                .map_err(|_| Status::invalid_argument(format!("{name} header is not valid text")))
        })
        .transpose()
}

/// The enrolled agent whose client certificate a call was made with.
#[derive(Debug, Clone)]
pub struct AgentCert {
    /// The agent.
    pub agent: Uuid,
    /// Its site.
    pub site: Uuid,
    /// SHA-256 of the certificate presented.
    pub sha256: Vec<u8>,
    /// When that certificate expires.
    pub not_after: std::time::SystemTime,
}

/// The enrolled agent whose client certificate the call was made with; None
/// without a client certificate. A certificate that is no enrolled agent's current
/// one is refused.
pub async fn agent_cert<T>(
    store: &Store,
    request: &Request<T>,
) -> Result<Option<AgentCert>, Status> {
    let Some(leaf) = request.peer_certs().and_then(|c| c.first().cloned()) else {
        return Ok(None);
    };
    let sha = Sha256::digest(leaf.as_ref()).to_vec();
    let (agent, site, not_after) = store
        .agent_cert_authenticate(&sha)
        .await
        .map_err(store_status)?
        .ok_or_else(|| {
            Status::unauthenticated(
                "this agent certificate is revoked, expired or was renewed: enroll again with a new enrollment code",
            )
        })?;
    Ok(Some(AgentCert {
        agent,
        site,
        sha256: sha,
        not_after,
    }))
}

/// Authenticates an agent by its client certificate or, failing that, its bearer
/// token; returns its site, which alone decides what it receives, who it is, and
/// when its certificate expires.
pub async fn agent<T>(
    store: &Store,
    request: &Request<T>,
) -> Result<(Uuid, AgentPrincipal, Option<std::time::SystemTime>), Status> {
    if let Some(cert) = agent_cert(store, request).await? {
        return Ok((
            cert.site,
            AgentPrincipal::Agent(cert.agent),
            Some(cert.not_after),
        ));
    }
    let token = bearer(request.metadata().as_ref(), "agent").map_err(|_| {
        Status::unauthenticated(
            "no agent identity: connect with the client certificate from enrollment (mutual TLS) or send `authorization: Bearer <agent token>`",
        )
    })?;
    let site = store
        .agent_token_authenticate(&token)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::unauthenticated("unknown or revoked agent token"))?;
    Ok((
        site,
        AgentPrincipal::Token(keyplane_store::token_hash(&token)),
        None,
    ))
}

/// The peer's address, over plaintext or TLS.
pub fn peer_addr(extensions: &tonic::codegen::http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// Failed authentications a peer address may make within [`AUTH_FAILURE_WINDOW`];
/// past it, its calls are refused with RESOURCE_EXHAUSTED until the window ends,
/// without asking the database.
pub const AUTH_FAILURES_MAX: u32 = 10;
/// See [`AUTH_FAILURES_MAX`].
pub const AUTH_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Most peers remembered; past it the oldest windows are forgotten.
const LIMITER_MAX_PEERS: usize = 10_000;

/// Failed authentications per peer address (per replica).
#[derive(Debug, Default)]
pub struct FailureLimiter {
    peers: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl FailureLimiter {
    /// How long `ip` stays refused, if it is.
    pub fn blocked(&self, ip: std::net::IpAddr) -> Option<std::time::Duration> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let (count, start) = peers.get(&ip)?;
        let left = AUTH_FAILURE_WINDOW.checked_sub(start.elapsed())?;
        (*count >= AUTH_FAILURES_MAX).then_some(left)
    }

    /// Counts a failed authentication from `ip`.
    pub fn failed(&self, ip: std::net::IpAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= LIMITER_MAX_PEERS {
            peers.retain(|_, (_, start)| start.elapsed() < AUTH_FAILURE_WINDOW);
        }
        let entry = peers.entry(ip).or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() >= AUTH_FAILURE_WINDOW {
            *entry = (0, std::time::Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

/// A tower layer authenticating every call of the service it wraps as a dealer's.
#[derive(Debug, Clone)]
pub struct DealerAuthLayer {
    store: Store,
    limiter: std::sync::Arc<FailureLimiter>,
}

impl DealerAuthLayer {
    /// A layer verifying dealer tokens through `store`.
    pub fn new(store: Store) -> Self {
        DealerAuthLayer {
            store,
            limiter: Default::default(),
        }
    }
}

impl<S> tower_layer::Layer<S> for DealerAuthLayer {
    type Service = DealerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DealerAuth {
            inner,
            store: self.store.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

/// A service whose calls are authenticated as a dealer's (see [`DealerAuthLayer`]).
#[derive(Debug, Clone)]
pub struct DealerAuth<S> {
    inner: S,
    store: Store,
    limiter: std::sync::Arc<FailureLimiter>,
}

impl<S, B> Service<HttpRequest<B>> for DealerAuth<S>
where
    S: Service<HttpRequest<B>, Response = HttpResponse<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = HttpResponse<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest<B>) -> Self::Future {
        // The clone may not be ready; the service that was polled ready is the one
        // called (the tower idiom), the clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        let limiter = self.limiter.clone();
        let span = crate::trace::rpc_span(request.uri().path(), request.headers());
        let call = async move {
            let peer = peer_addr(request.extensions());
            if let Some(left) = peer.and_then(|p| limiter.blocked(p.ip())) {
                crate::metrics::call(request.uri().path(), tonic::Code::ResourceExhausted);
                return Ok(Status::resource_exhausted(format!(
                    "too many failed authentications from this address; retry in {} s",
                    left.as_secs().max(1)
                ))
                .into_http());
            }
            let path = request.uri().path().to_owned();
            match dealer(&store, &path, request.headers(), peer).await {
                Ok(actor) => {
                    let span = tracing::Span::current();
                    span.record("dealer", tracing::field::display(actor.dealer));
                    if let Some(id) = &actor.request_id {
                        span.record("request_id", id.as_str());
                    }
                    if let Some((site, _)) = actor.acting_user {
                        span.record("site", tracing::field::display(site));
                    }
                    request.extensions_mut().insert(actor);
                    if let Some(method) = path.strip_prefix("/keyplane.v1.AdminService/") {
                        request
                            .extensions_mut()
                            .insert(AdminMethod(method.to_owned()));
                    }
                    let started = std::time::Instant::now();
                    let response = inner
                        .call(request)
                        .await
                        .map(crate::error::undecodable_response_is_invalid);
                    tracing::debug!(elapsed_ms = started.elapsed().as_millis(), "call answered");
                    if let Ok(response) = &response {
                        crate::metrics::call(
                            &path,
                            crate::metrics::response_code(response.headers()),
                        );
                    }
                    response
                }
                Err(status) => {
                    crate::metrics::call(&path, status.code());
                    if status.code() == tonic::Code::Unauthenticated
                        && let Some(p) = peer
                    {
                        limiter.failed(p.ip());
                    }
                    Ok(status.into_http())
                }
            }
        };
        Box::pin(tracing::Instrument::instrument(call, span))
    }
}

impl<S: NamedService> NamedService for DealerAuth<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::Code;
    use tower_layer::Layer;

    #[test]
    fn only_the_writes_that_load_the_actor_skip_the_separate_check() {
        for (path, skips) in [
            ("/keyplane.v1.AdminService/CreateCredential", true),
            ("/keyplane.v1.AdminService/ResolveDrift", true),
            ("/keyplane.v1.AdminService/CreateDevice", false),
            ("/keyplane.v1.AdminService/ListUsers", false),
            ("/other.Service/CreateCredential", false),
            ("CreateCredential", false),
        ] {
            assert_eq!(store_checks_actor(path), skips, "{path}");
        }
    }

    /// Stands in for AdminService: counts the calls that reach it.
    #[derive(Clone, Default)]
    struct Handler(Arc<AtomicUsize>);

    impl Service<HttpRequest<Body>> for Handler {
        type Response = HttpResponse<Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: HttpRequest<Body>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(HttpResponse::new(Body::empty())) })
        }
    }

    #[tokio::test]
    async fn refused_headers_never_reach_the_handler() {
        // The store is never reached for these: the pool connects lazily.
        let key = keyplane_store::PinKey::generate().expect("key");
        let store = Store::connect("postgres://nobody@127.0.0.1:1/none", 1, key).expect("store");
        let handler = Handler::default();
        let mut service = DealerAuthLayer::new(store).layer(handler.clone());
        // (authorization header, words the message must hold)
        let cases: [(Option<&str>, &str); 4] = [
            (None, "missing authorization metadata"),
            (Some("Basic a2V5cGxhbmU="), "must be `Bearer <token>`"),
            (Some("Bearer "), "must be `Bearer <token>`"),
            (Some("kpd_token_without_scheme"), "must be `Bearer <token>`"),
        ];
        for (authorization, words) in cases {
            let mut request = HttpRequest::new(Body::empty());
            if let Some(value) = authorization {
                request
                    .headers_mut()
                    .insert("authorization", value.parse().expect("header"));
            }
            let response = service.call(request).await.expect("infallible");
            let status = Status::from_header_map(response.headers()).expect("a gRPC status");
            assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
            assert!(
                status.message().contains(words),
                "{authorization:?}: {}",
                status.message()
            );
        }
        assert_eq!(handler.0.load(Ordering::SeqCst), 0, "no call got through");
    }

    #[test]
    fn a_handler_without_the_layer_is_an_internal_error() {
        let status = actor(&Request::new(())).expect_err("no actor");
        assert_eq!(status.code(), Code::Internal);
    }
}
