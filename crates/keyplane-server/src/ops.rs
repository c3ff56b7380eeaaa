//! OpsService: the operators' calls (issue 17). Authenticated like AdminService by
//! [`crate::auth::DealerAuthLayer`], whose scope rule (`keyplane_core::scope`) admits
//! ops and admin tokens only; every call sees the dealer's own sites only.
//!
//! Nothing here holds state: connections are read from the site rows every replica
//! writes (`keyplane_store::ops`), and the remedies are writes the wake-up poller of
//! the replica holding the stream picks up; this replica's own streams are told at
//! once through the [`Hub`].

use crate::auth;
use crate::error::{name_status, store_status};
use crate::hub::Hub;
use crate::page::list_page;
use keyplane_core::names::{AgentConnectionName, OpsStatusName, SiteName};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::ops_service_server::OpsService;
use keyplane_store::{self as store, Store};
use std::time::SystemTime;
use tonic::{Request, Response, Status};

type Res<T> = Result<Response<T>, Status>;

/// The OpsService implementation.
#[derive(Debug, Clone)]
pub struct OpsApi {
    store: Store,
    hub: Hub,
}

impl OpsApi {
    /// Builds the service.
    pub fn new(store: Store, hub: Hub) -> Self {
        OpsApi { store, hub }
    }
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn connection_pb(c: &store::AgentConnection) -> pb::AgentConnection {
    pb::AgentConnection {
        name: AgentConnectionName { site: c.site }.to_string(),
        site: SiteName { site: c.site }.to_string(),
        agent: c.agent.map(|a| format!("agents/{a}")).unwrap_or_default(),
        agent_version: c.agent_version.clone(),
        protocol_version: c.protocol_version,
        peer: c.peer.clone().unwrap_or_default(),
        replica: c.replica.clone().unwrap_or_default(),
        connect_time: c.connect_time.map(ts),
        last_seen_time: c.last_seen.map(ts),
    }
}

fn ops_status_pb(site: OpsStatusName, s: &store::SiteOpsStatus) -> pb::SiteOpsStatus {
    pb::SiteOpsStatus {
        name: site.to_string(),
        revision: s.revision,
        pending_changes: s.pending_changes(),
        oldest_pending_time: s.oldest_pending().map(ts),
        oldest_pending_age: s
            .oldest_pending_age()
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        agent_connected: s.agent_connected,
        devices: s
            .devices
            .iter()
            .filter(|d| d.pending_changes > 0)
            .map(|d| pb::DevicePendingChanges {
                device: format!("sites/{}/devices/{}", site.site, d.device),
                applied_revision: d.applied_revision,
                pending_changes: d.pending_changes,
                oldest_pending_time: d.oldest_pending.map(ts),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl OpsService for OpsApi {
    async fn list_agent_connections(
        &self,
        request: Request<pb::ListAgentConnectionsRequest>,
    ) -> Res<pb::ListAgentConnectionsResponse> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let site = if req.parent == "sites/-" {
            None
        } else {
            Some(
                SiteName::parse(&req.parent)
                    .map_err(|e| name_status("parent", e))?
                    .site,
            )
        };
        if site.is_some() {
            crate::trace::record_site(&req.parent);
        }
        let list = format!("ListAgentConnections {}", req.parent);
        let (connections, next_page_token) = list_page(
            &list,
            req.page_size,
            &req.page_token,
            |c: &store::AgentConnection| c.site.to_string(),
            |page| self.store.agent_connections(actor.dealer, site, page),
        )
        .await?;
        Ok(Response::new(pb::ListAgentConnectionsResponse {
            agent_connections: connections.iter().map(connection_pb).collect(),
            next_page_token,
        }))
    }

    async fn resync_site(
        &self,
        request: Request<pb::ResyncSiteRequest>,
    ) -> Res<pb::ResyncSiteResponse> {
        let actor = auth::actor(&request)?;
        let site = SiteName::parse(&request.get_ref().name)
            .map_err(|e| name_status("name", e))?
            .site;
        crate::trace::record_site(&request.get_ref().name);
        let done = self
            .store
            .site_resync(&actor, site)
            .await
            .map_err(store_status)?;
        // A stream on this replica resends now; one on another replica when its
        // poller sees the site's change_time move.
        self.hub.resync(site, done.resync);
        tracing::info!(%site, dealer = %actor.dealer, revision = done.revision, connected = done.agent_connected, "resync requested");
        Ok(Response::new(pb::ResyncSiteResponse {
            revision: done.revision,
            agent_connected: done.agent_connected,
        }))
    }

    async fn close_agent_connection(
        &self,
        request: Request<pb::CloseAgentConnectionRequest>,
    ) -> Res<()> {
        let actor = auth::actor(&request)?;
        let site = AgentConnectionName::parse(&request.get_ref().name)
            .map_err(|e| name_status("name", e))?
            .site;
        crate::trace::record_site(&request.get_ref().name);
        let epoch = self
            .store
            .agent_connection_close(&actor, site)
            .await
            .map_err(store_status)?;
        self.hub.epoch(site, epoch);
        tracing::info!(%site, dealer = %actor.dealer, "agent stream closed by an operator");
        Ok(Response::new(()))
    }

    async fn get_site_ops_status(
        &self,
        request: Request<pb::GetSiteOpsStatusRequest>,
    ) -> Res<pb::SiteOpsStatus> {
        let actor = auth::actor(&request)?;
        let name =
            OpsStatusName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        crate::trace::record_site(&request.get_ref().name);
        let status = self
            .store
            .site_ops_status(actor.dealer, name.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(ops_status_pb(name, &status)))
    }
}
