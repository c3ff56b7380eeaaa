//! AdminService: the dealer back-office API, one module per resource.
//!
//! Every handler has one shape: take the dealer [`auth::DealerAuthLayer`] put on the
//! call ([`dealer_call`]), parse names and fields into domain values (refusing bad
//! input before touching the database: [`parse`], [`required`], `crate::fields`),
//! call the store (its errors become statuses in `crate::error`), wake the site's
//! agents when desired state changed, and convert the result (`crate::resources`).
//! The trait impl below only routes each RPC to its resource module.

mod backup;
mod credential;
mod device;
mod event;
pub use event::MAX_WATCHES_PER_DEALER;
mod holiday;
mod local;
mod partition;
mod plan;
mod retention;
mod site;
mod token;
mod user;

use crate::auth;
use crate::error::{name_status, store_status};
use crate::fields;
use crate::hub::{EventBell, Hub};
use crate::mask::mask_paths;
use crate::page::{list_page, page_cursor, page_partitions, page_split};
use crate::resources as res;
use keyplane_core::names::{
    AccessPlanName, CredentialName, DeviceName, HolidayName, LocalCodeName, NameError,
    PartitionName, PersonalPlanName, SiteName, SyncStatusName, UserName,
};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_server::AdminService;
use keyplane_store::{self as store, RequestKey, Store};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The AdminService implementation.
#[derive(Debug, Clone)]
pub struct AdminApi {
    store: Store,
    hub: Hub,
    bell: EventBell,
    shutdown: CancellationToken,
    watches: event::Watches,
}

impl AdminApi {
    /// Builds the service.
    pub fn new(store: Store, hub: Hub, bell: EventBell, shutdown: CancellationToken) -> Self {
        AdminApi {
            watches: event::Watches::new(store.clone()),
            store,
            hub,
            bell,
            shutdown,
        }
    }

    /// The idempotency key of a create request (body fingerprinted without request_id).
    fn request_key<M: Message + Clone>(
        &self,
        method: &'static str,
        request_id: &str,
        body: &M,
    ) -> Result<Option<RequestKey>, Status> {
        if request_id.is_empty() {
            return Ok(None);
        }
        if request_id.len() > 128 {
            return Err(Status::invalid_argument(
                "request_id must be at most 128 characters",
            ));
        }
        Ok(Some(RequestKey {
            request_id: request_id.to_owned(),
            method,
            fingerprint: self.store.key().fingerprint(method, &body.encode_to_vec()),
        }))
    }
}

/// Refuses a site user acting through the back office on calls that configure the site.
fn installer_only(actor: &store::Actor, what: &str) -> Result<(), Status> {
    let user = actor
        .acting_user
        .map(|(site, user)| UserName { site, user }.to_string());
    keyplane_core::authority::check_installer_only(user.as_deref(), what)
        .map_err(crate::error::authority_status)
}

/// The dealer the auth layer authenticated for this call, and the call's body.
fn dealer_call<T: Message>(request: Request<T>) -> Result<(store::Actor, T), Status> {
    let actor = auth::actor(&request)?;
    if let Some(method) = request.extensions().get::<auth::AdminMethod>() {
        crate::limits::check(&method.0, request.get_ref())?;
    }
    Ok((actor, request.into_inner()))
}

/// Parses resource name `value` of request field `field`.
fn parse<N>(
    field: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<N, NameError>,
) -> Result<N, Status> {
    let parsed = parse(value).map_err(|e| name_status(field, e))?;
    crate::trace::record_site(value);
    Ok(parsed)
}

/// A message field the call cannot do without.
fn required<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))
}

/// The ids named by `names` (field `field`), each once and in order; every name
/// must be of `site`, else `field[i] {elsewhere}`.
fn site_ids<N>(
    field: &str,
    names: &[String],
    site: Uuid,
    parse_name: impl Fn(&str) -> Result<N, NameError>,
    site_and_id: impl Fn(&N) -> (Uuid, Uuid),
    elsewhere: &str,
) -> Result<Vec<Uuid>, Status> {
    let mut ids = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let (of, id) = site_and_id(&parse(&format!("{field}[{i}]"), n, &parse_name)?);
        if of != site {
            return Err(Status::invalid_argument(format!(
                "{field}[{i}] {elsewhere}"
            )));
        }
        // A repeated name means the same resource once.
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_site(&self, request: Request<pb::CreateSiteRequest>) -> Res<pb::Site> {
        site::create(self, request).await
    }

    async fn get_site(&self, request: Request<pb::GetSiteRequest>) -> Res<pb::Site> {
        site::get(self, request).await
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Res<pb::ListSitesResponse> {
        site::list(self, request).await
    }

    async fn update_site(&self, request: Request<pb::UpdateSiteRequest>) -> Res<pb::Site> {
        site::update(self, request).await
    }

    async fn delete_site(&self, request: Request<pb::DeleteSiteRequest>) -> Res<()> {
        site::delete(self, request).await
    }

    async fn lockdown_doors(&self, request: Request<pb::LockdownDoorsRequest>) -> Res<()> {
        site::lockdown(self, request).await
    }

    async fn release_lockdown(&self, request: Request<pb::ReleaseLockdownRequest>) -> Res<()> {
        site::lockdown_release(self, request).await
    }

    async fn get_sync_status(
        &self,
        request: Request<pb::GetSyncStatusRequest>,
    ) -> Res<pb::SyncStatus> {
        site::sync_status(self, request).await
    }

    async fn issue_agent_token(
        &self,
        request: Request<pb::IssueAgentTokenRequest>,
    ) -> Res<pb::IssueAgentTokenResponse> {
        site::agent_token_issue(self, request).await
    }

    async fn create_enrollment_code(
        &self,
        request: Request<pb::CreateEnrollmentCodeRequest>,
    ) -> Res<pb::EnrollmentCode> {
        site::enrollment_code_create(self, request).await
    }

    async fn revoke_agents(
        &self,
        request: Request<pb::RevokeAgentsRequest>,
    ) -> Res<pb::RevokeAgentsResponse> {
        site::agents_revoke(self, request).await
    }

    async fn create_dealer_token(
        &self,
        request: Request<pb::CreateDealerTokenRequest>,
    ) -> Res<pb::CreateDealerTokenResponse> {
        token::create(self, request).await
    }

    async fn list_dealer_tokens(
        &self,
        request: Request<pb::ListDealerTokensRequest>,
    ) -> Res<pb::ListDealerTokensResponse> {
        token::list(self, request).await
    }

    async fn revoke_dealer_token(&self, request: Request<pb::RevokeDealerTokenRequest>) -> Res<()> {
        token::revoke(self, request).await
    }

    async fn create_partition(
        &self,
        request: Request<pb::CreatePartitionRequest>,
    ) -> Res<pb::Partition> {
        partition::create(self, request).await
    }

    async fn get_partition(&self, request: Request<pb::GetPartitionRequest>) -> Res<pb::Partition> {
        partition::get(self, request).await
    }

    async fn list_partitions(
        &self,
        request: Request<pb::ListPartitionsRequest>,
    ) -> Res<pb::ListPartitionsResponse> {
        partition::list(self, request).await
    }

    async fn update_partition(
        &self,
        request: Request<pb::UpdatePartitionRequest>,
    ) -> Res<pb::Partition> {
        partition::update(self, request).await
    }

    async fn delete_partition(&self, request: Request<pb::DeletePartitionRequest>) -> Res<()> {
        partition::delete(self, request).await
    }

    async fn create_device(&self, request: Request<pb::CreateDeviceRequest>) -> Res<pb::Device> {
        device::create(self, request).await
    }

    async fn get_device(&self, request: Request<pb::GetDeviceRequest>) -> Res<pb::Device> {
        device::get(self, request).await
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Res<pb::ListDevicesResponse> {
        device::list(self, request).await
    }

    async fn update_device(&self, request: Request<pb::UpdateDeviceRequest>) -> Res<pb::Device> {
        device::update(self, request).await
    }

    async fn delete_device(&self, request: Request<pb::DeleteDeviceRequest>) -> Res<()> {
        device::delete(self, request).await
    }

    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Res<pb::User> {
        user::create(self, request).await
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Res<pb::User> {
        user::get(self, request).await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Res<pb::ListUsersResponse> {
        user::list(self, request).await
    }

    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Res<pb::User> {
        user::update(self, request).await
    }

    async fn delete_user(&self, request: Request<pb::DeleteUserRequest>) -> Res<()> {
        user::delete(self, request).await
    }

    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Res<pb::Credential> {
        credential::create(self, request).await
    }

    async fn get_credential(
        &self,
        request: Request<pb::GetCredentialRequest>,
    ) -> Res<pb::Credential> {
        credential::get(self, request).await
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Res<pb::ListCredentialsResponse> {
        credential::list(self, request).await
    }

    async fn update_credential(
        &self,
        request: Request<pb::UpdateCredentialRequest>,
    ) -> Res<pb::Credential> {
        credential::update(self, request).await
    }

    async fn delete_credential(&self, request: Request<pb::DeleteCredentialRequest>) -> Res<()> {
        credential::delete(self, request).await
    }

    async fn get_personal_access_plan(
        &self,
        request: Request<pb::GetPersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        plan::personal_get(self, request).await
    }

    async fn update_personal_access_plan(
        &self,
        request: Request<pb::UpdatePersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        plan::personal_update(self, request).await
    }

    async fn clear_personal_access_plan(
        &self,
        request: Request<pb::ClearPersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        plan::personal_clear(self, request).await
    }

    async fn create_access_plan(
        &self,
        request: Request<pb::CreateAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        plan::create(self, request).await
    }

    async fn get_access_plan(
        &self,
        request: Request<pb::GetAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        plan::get(self, request).await
    }

    async fn list_access_plans(
        &self,
        request: Request<pb::ListAccessPlansRequest>,
    ) -> Res<pb::ListAccessPlansResponse> {
        plan::list(self, request).await
    }

    async fn update_access_plan(
        &self,
        request: Request<pb::UpdateAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        plan::update(self, request).await
    }

    async fn delete_access_plan(&self, request: Request<pb::DeleteAccessPlanRequest>) -> Res<()> {
        plan::delete(self, request).await
    }

    async fn put_holiday(&self, request: Request<pb::PutHolidayRequest>) -> Res<pb::Holiday> {
        holiday::put(self, request).await
    }

    async fn list_holidays(
        &self,
        request: Request<pb::ListHolidaysRequest>,
    ) -> Res<pb::ListHolidaysResponse> {
        holiday::list(self, request).await
    }

    async fn delete_holiday(&self, request: Request<pb::DeleteHolidayRequest>) -> Res<()> {
        holiday::delete(self, request).await
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Res<pb::ListEventsResponse> {
        event::list(self, request).await
    }

    type WatchEventsStream = event::EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Res<Self::WatchEventsStream> {
        event::watch(self, request).await
    }

    async fn list_audit_log(
        &self,
        request: Request<pb::ListAuditLogRequest>,
    ) -> Res<pb::ListAuditLogResponse> {
        event::audit_list(self, request).await
    }

    async fn list_local_codes(
        &self,
        request: Request<pb::ListLocalCodesRequest>,
    ) -> Res<pb::ListLocalCodesResponse> {
        local::list(self, request).await
    }

    async fn claim_local_code(
        &self,
        request: Request<pb::ClaimLocalCodeRequest>,
    ) -> Res<pb::Credential> {
        local::claim(self, request).await
    }

    async fn remove_local_code(
        &self,
        request: Request<pb::RemoveLocalCodeRequest>,
    ) -> Res<pb::LocalCode> {
        local::remove(self, request).await
    }

    async fn resolve_drift(
        &self,
        request: Request<pb::ResolveDriftRequest>,
    ) -> Res<pb::Credential> {
        local::drift_resolve(self, request).await
    }

    async fn configure_backup_codes(
        &self,
        request: Request<pb::ConfigureBackupCodesRequest>,
    ) -> Res<pb::BackupCodePool> {
        backup::configure(self, request).await
    }

    async fn pull_backup_code(
        &self,
        request: Request<pb::PullBackupCodeRequest>,
    ) -> Res<pb::Credential> {
        backup::pull(self, request).await
    }

    async fn get_retention_policy(
        &self,
        request: Request<pb::GetRetentionPolicyRequest>,
    ) -> Res<pb::RetentionPolicy> {
        retention::get(self, request).await
    }

    async fn update_retention_policy(
        &self,
        request: Request<pb::UpdateRetentionPolicyRequest>,
    ) -> Res<pb::RetentionPolicy> {
        retention::update(self, request).await
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Res<pb::EraseUserResponse> {
        retention::erase_user(self, request).await
    }
}
