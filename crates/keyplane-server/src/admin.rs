//! AdminService: the dealer back-office API. Each handler authenticates the dealer,
//! converts the request into domain values (refusing bad input before touching the
//! database), calls the store, and converts the result back.

use crate::auth;
use crate::error::{name_status, store_status};
use crate::fields;
use crate::hub::{EventBell, Hub};
use crate::mask::mask_paths;
use crate::page::{list_page, page_cursor, page_partitions, page_split};
use crate::resources as res;
use keyplane_core::names::{
    AccessPlanName, CredentialName, DeviceName, HolidayName, LocalCodeName, PartitionName,
    PersonalPlanName, SiteName, SyncStatusName, UserName,
};
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_server::AdminService;
use keyplane_store::{self as store, RequestKey, Store};
use prost::Message;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The AdminService implementation.
#[derive(Debug, Clone)]
pub struct AdminApi {
    store: Store,
    hub: Hub,
    bell: EventBell,
    shutdown: CancellationToken,
}

impl AdminApi {
    /// Builds the service.
    pub fn new(store: Store, hub: Hub, bell: EventBell, shutdown: CancellationToken) -> Self {
        AdminApi {
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
        .map(|(site, user)| format!("sites/{site}/users/{user}"));
    keyplane_core::authority::check_installer_only(user.as_deref(), what)
        .map_err(crate::error::authority_status)
}

fn site_name(field: &str, name: &str) -> Result<SiteName, Status> {
    SiteName::parse(name).map_err(|e| name_status(field, e))
}

fn plan_name(field: &str, name: &str) -> Result<PersonalPlanName, Status> {
    PersonalPlanName::parse(name).map_err(|e| name_status(field, e))
}

fn access_plan_name(field: &str, name: &str) -> Result<(uuid::Uuid, uuid::Uuid), Status> {
    let name = AccessPlanName::parse(name).map_err(|e| name_status(field, e))?;
    Ok((name.site, name.plan))
}

fn holiday_name(field: &str, name: &str) -> Result<(uuid::Uuid, chrono::NaiveDate), Status> {
    let name = HolidayName::parse(name).map_err(|e| name_status(field, e))?;
    Ok((name.site, name.day))
}

fn local_code_name(field: &str, name: &str) -> Result<(DeviceName, u16), Status> {
    let name = LocalCodeName::parse(name).map_err(|e| name_status(field, e))?;
    Ok((name.device, name.slot))
}

fn required<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_site(&self, request: Request<pb::CreateSiteRequest>) -> Res<pb::Site> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "creating a site")?;
        let req = request.into_inner();
        let site = required("site", req.site.as_ref())?;
        let new = store::NewSite {
            display_name: fields::display_name("site.display_name", &site.display_name)?,
            time_zone: fields::time_zone(&site.time_zone)?,
            local_code_policy: fields::policy(site.local_code_policy)?,
        };
        let key = self.request_key("CreateSite", &req.request_id, site)?;
        let created = self
            .store
            .site_create(&actor, &new, key.as_ref())
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::site_pb(&created)))
    }

    async fn get_site(&self, request: Request<pb::GetSiteRequest>) -> Res<pb::Site> {
        let actor = auth::actor(&request)?;
        let name = site_name("name", &request.get_ref().name)?;
        let site = self
            .store
            .site_get(actor.dealer, name.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::site_pb(&site)))
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Res<pb::ListSitesResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let (sites, next_page_token) = list_page(
            "ListSites",
            req.page_size,
            &req.page_token,
            |s: &store::Site| s.id.to_string(),
            |p| self.store.site_list(actor.dealer, p),
        )
        .await?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: sites.iter().map(res::site_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_site(&self, request: Request<pb::UpdateSiteRequest>) -> Res<pb::Site> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "changing a site")?;
        let req = request.into_inner();
        let site = required("site", req.site.as_ref())?;
        let name = site_name("site.name", &site.name)?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("display_name", !site.display_name.is_empty()),
                ("time_zone", !site.time_zone.is_empty()),
                ("local_code_policy", site.local_code_policy != 0),
            ],
        )?;
        let mut patch = store::SitePatch::default();
        for p in &paths {
            match p.as_str() {
                "display_name" => {
                    patch.display_name = Some(fields::display_name(
                        "site.display_name",
                        &site.display_name,
                    )?)
                }
                "time_zone" => patch.time_zone = Some(fields::time_zone(&site.time_zone)?),
                _ => patch.local_code_policy = Some(fields::policy(site.local_code_policy)?),
            }
        }
        let updated = self
            .store
            .site_update(&actor, name.site, &patch, &site.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(res::site_pb(&updated)))
    }

    async fn delete_site(&self, request: Request<pb::DeleteSiteRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "deleting a site")?;
        let req = request.get_ref();
        let name = site_name("name", &req.name)?;
        self.store
            .site_delete(&actor, name.site, &req.etag)
            .await
            .map_err(store_status)?;
        Ok(Response::new(()))
    }

    async fn create_partition(
        &self,
        request: Request<pb::CreatePartitionRequest>,
    ) -> Res<pb::Partition> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "adding a partition")?;
        let req = request.into_inner();
        let parent = site_name("parent", &req.parent)?;
        let partition = required("partition", req.partition.as_ref())?;
        let number = fields::partition("partition.number", partition.number)?;
        let display_name = if partition.display_name.is_empty() {
            format!("Partition {number}")
        } else {
            fields::display_name("partition.display_name", &partition.display_name)?
        };
        let key = self.request_key("CreatePartition", &req.request_id, &req)?;
        let created = self
            .store
            .partition_create(&actor, parent.site, number, &display_name, key.as_ref())
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::partition_pb(&created)))
    }

    async fn get_partition(&self, request: Request<pb::GetPartitionRequest>) -> Res<pb::Partition> {
        let actor = auth::actor(&request)?;
        let name =
            PartitionName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        let p = self
            .store
            .partition_get(actor.dealer, name.site, name.number)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::partition_pb(&p)))
    }

    async fn list_partitions(
        &self,
        request: Request<pb::ListPartitionsRequest>,
    ) -> Res<pb::ListPartitionsResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = site_name("parent", &req.parent)?;
        let list = format!("ListPartitions sites/{}", parent.site);
        let (after, limit) = page_partitions(&list, req.page_size, &req.page_token)?;
        let items = self
            .store
            .partition_list(actor.dealer, parent.site, after, limit + 1)
            .await
            .map_err(store_status)?;
        let (items, next_page_token) = page_split(&list, items, limit, |p| p.number.to_string());
        Ok(Response::new(pb::ListPartitionsResponse {
            partitions: items.iter().map(res::partition_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_partition(
        &self,
        request: Request<pb::UpdatePartitionRequest>,
    ) -> Res<pb::Partition> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "renaming a partition")?;
        let req = request.into_inner();
        let partition = required("partition", req.partition.as_ref())?;
        let name =
            PartitionName::parse(&partition.name).map_err(|e| name_status("partition.name", e))?;
        mask_paths(
            req.update_mask.as_ref(),
            &[("display_name", !partition.display_name.is_empty())],
        )?;
        let display_name = fields::display_name("partition.display_name", &partition.display_name)?;
        let updated = self
            .store
            .partition_update(
                &actor,
                name.site,
                name.number,
                Some(&display_name),
                &partition.etag,
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::partition_pb(&updated)))
    }

    async fn delete_partition(&self, request: Request<pb::DeletePartitionRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "deleting a partition")?;
        let req = request.get_ref();
        let name = PartitionName::parse(&req.name).map_err(|e| name_status("name", e))?;
        self.store
            .partition_delete(&actor, name.site, name.number, &req.etag)
            .await
            .map_err(store_status)?;
        Ok(Response::new(()))
    }

    async fn create_device(&self, request: Request<pb::CreateDeviceRequest>) -> Res<pb::Device> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "adding a device")?;
        let req = request.into_inner();
        let parent = site_name("parent", &req.parent)?;
        let device = required("device", req.device.as_ref())?;
        let new = store::NewDevice {
            display_name: fields::display_name("device.display_name", &device.display_name)?,
            model: fields::device_model(device.kind, &device.model)?,
            partition: fields::partition_opt("device.partition", device.partition)?,
            perimeter: device.perimeter,
        };
        let key = self.request_key("CreateDevice", &req.request_id, &req)?;
        let created = self
            .store
            .device_create(&actor, parent.site, &new, key.as_ref())
            .await
            .map_err(store_status)?;
        self.hub.poke(parent.site);
        Ok(Response::new(res::device_pb(&created)))
    }

    async fn get_device(&self, request: Request<pb::GetDeviceRequest>) -> Res<pb::Device> {
        let actor = auth::actor(&request)?;
        let name =
            DeviceName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        let d = self
            .store
            .device_get(actor.dealer, name.site, name.device)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::device_pb(&d)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Res<pb::ListDevicesResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = site_name("parent", &req.parent)?;
        let (items, next_page_token) = list_page(
            &format!("ListDevices sites/{}", parent.site),
            req.page_size,
            &req.page_token,
            |d: &store::Device| d.id.to_string(),
            |p| self.store.device_list(actor.dealer, parent.site, p),
        )
        .await?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: items.iter().map(res::device_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_device(&self, request: Request<pb::UpdateDeviceRequest>) -> Res<pb::Device> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "changing a device")?;
        let req = request.into_inner();
        let device = required("device", req.device.as_ref())?;
        let name = DeviceName::parse(&device.name).map_err(|e| name_status("device.name", e))?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("display_name", !device.display_name.is_empty()),
                ("partition", device.partition != 0),
                ("perimeter", device.perimeter),
            ],
        )?;
        let mut patch = store::DevicePatch::default();
        for p in &paths {
            match p.as_str() {
                "display_name" => {
                    patch.display_name = Some(fields::display_name(
                        "device.display_name",
                        &device.display_name,
                    )?)
                }
                "partition" => {
                    patch.partition =
                        Some(fields::partition_opt("device.partition", device.partition)?)
                }
                _ => patch.perimeter = Some(device.perimeter),
            }
        }
        let updated = self
            .store
            .device_update(&actor, name.site, name.device, &patch, &device.etag)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::device_pb(&updated)))
    }

    async fn delete_device(&self, request: Request<pb::DeleteDeviceRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "deleting a device")?;
        let req = request.get_ref();
        let name = DeviceName::parse(&req.name).map_err(|e| name_status("name", e))?;
        self.store
            .device_delete(&actor, name.site, name.device, &req.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(()))
    }

    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Res<pb::User> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let parent = site_name("parent", &req.parent)?;
        let user = required("user", req.user.as_ref())?;
        let new = store::NewUser {
            display_name: fields::display_name("user.display_name", &user.display_name)?,
            authorities: fields::authorities("user.authorities", &user.authorities)?,
            open_close_reporting: user.open_close_reporting,
        };
        let key = self.request_key("CreateUser", &req.request_id, &req)?;
        let created = self
            .store
            .user_create(&actor, parent.site, &new, key.as_ref())
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::user_pb(&created)))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Res<pb::User> {
        let actor = auth::actor(&request)?;
        let name = UserName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        let u = self
            .store
            .user_get(actor.dealer, name.site, name.user)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::user_pb(&u)))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Res<pb::ListUsersResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = site_name("parent", &req.parent)?;
        let (items, next_page_token) = list_page(
            &format!("ListUsers sites/{}", parent.site),
            req.page_size,
            &req.page_token,
            |u: &store::User| u.id.to_string(),
            |p| self.store.user_list(actor.dealer, parent.site, p),
        )
        .await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: items.iter().map(res::user_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Res<pb::User> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let user = required("user", req.user.as_ref())?;
        let name = UserName::parse(&user.name).map_err(|e| name_status("user.name", e))?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("display_name", !user.display_name.is_empty()),
                ("authorities", !user.authorities.is_empty()),
                ("open_close_reporting", user.open_close_reporting),
            ],
        )?;
        let mut patch = store::UserPatch::default();
        for p in &paths {
            match p.as_str() {
                "display_name" => {
                    patch.display_name = Some(fields::display_name(
                        "user.display_name",
                        &user.display_name,
                    )?)
                }
                "authorities" => {
                    patch.authorities =
                        Some(fields::authorities("user.authorities", &user.authorities)?)
                }
                _ => patch.open_close_reporting = Some(user.open_close_reporting),
            }
        }
        let updated = self
            .store
            .user_update(&actor, name.site, name.user, &patch, &user.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(res::user_pb(&updated)))
    }

    async fn delete_user(&self, request: Request<pb::DeleteUserRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let name = UserName::parse(&req.name).map_err(|e| name_status("name", e))?;
        self.store
            .user_delete(&actor, name.site, name.user, &req.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(()))
    }

    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Res<pb::Credential> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let parent = UserName::parse(&req.parent).map_err(|e| name_status("parent", e))?;
        let credential = required("credential", req.credential.as_ref())?;
        let new = store::NewCredential {
            display_name: if credential.display_name.is_empty() {
                "PIN".to_owned()
            } else {
                fields::display_name("credential.display_name", &credential.display_name)?
            },
            pin: fields::pin("credential.pin", &credential.pin)?,
            scope: fields::scope(parent.site, credential.scope.as_ref())?,
            valid_from: credential
                .valid_from_time
                .as_ref()
                .map(|t| fields::timestamp("credential.valid_from_time", t))
                .transpose()?,
            valid_until: credential
                .valid_until_time
                .as_ref()
                .map(|t| fields::timestamp("credential.valid_until_time", t))
                .transpose()?,
            max_uses: match credential.max_uses {
                0 => None,
                n if n < 0 => {
                    return Err(Status::invalid_argument(
                        "credential.max_uses must not be negative",
                    ));
                }
                n => Some(n),
            },
        };
        let key = self.request_key("CreateCredential", &req.request_id, &req)?;
        let created = self
            .store
            .credential_create(&actor, parent.site, parent.user, &new, key.as_ref())
            .await
            .map_err(store_status)?;
        self.hub.poke(parent.site);
        Ok(Response::new(res::credential_pb(&created)))
    }

    async fn get_credential(
        &self,
        request: Request<pb::GetCredentialRequest>,
    ) -> Res<pb::Credential> {
        let actor = auth::actor(&request)?;
        let name =
            CredentialName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        let c = self
            .store
            .credential_get(actor.dealer, name.site, name.user, name.credential)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::credential_pb(&c)))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Res<pb::ListCredentialsResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = UserName::parse(&req.parent).map_err(|e| name_status("parent", e))?;
        let (items, next_page_token) = list_page(
            &format!(
                "ListCredentials sites/{}/users/{}",
                parent.site, parent.user
            ),
            req.page_size,
            &req.page_token,
            |c: &store::Credential| c.id.to_string(),
            |p| {
                self.store
                    .credential_list(actor.dealer, parent.site, parent.user, p)
            },
        )
        .await?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: items.iter().map(res::credential_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_credential(
        &self,
        request: Request<pb::UpdateCredentialRequest>,
    ) -> Res<pb::Credential> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let credential = required("credential", req.credential.as_ref())?;
        let name = CredentialName::parse(&credential.name)
            .map_err(|e| name_status("credential.name", e))?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("display_name", !credential.display_name.is_empty()),
                ("pin", !credential.pin.is_empty()),
                ("scope", credential.scope.is_some()),
            ],
        )?;
        let mut patch = store::CredentialPatch::default();
        for p in &paths {
            match p.as_str() {
                "display_name" => {
                    patch.display_name = Some(fields::display_name(
                        "credential.display_name",
                        &credential.display_name,
                    )?)
                }
                "pin" => patch.pin = Some(fields::pin("credential.pin", &credential.pin)?),
                _ => patch.scope = Some(fields::scope(name.site, credential.scope.as_ref())?),
            }
        }
        let updated = self
            .store
            .credential_update(
                &actor,
                name.site,
                name.user,
                name.credential,
                &patch,
                &credential.etag,
            )
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(res::credential_pb(&updated)))
    }

    async fn delete_credential(&self, request: Request<pb::DeleteCredentialRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let name = CredentialName::parse(&req.name).map_err(|e| name_status("name", e))?;
        self.store
            .credential_delete(&actor, name.site, name.user, name.credential, &req.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(name.site);
        Ok(Response::new(()))
    }

    async fn get_sync_status(
        &self,
        request: Request<pb::GetSyncStatusRequest>,
    ) -> Res<pb::SyncStatus> {
        let actor = auth::actor(&request)?;
        let site =
            SyncStatusName::parse(&request.get_ref().name).map_err(|e| name_status("name", e))?;
        let status = self
            .store
            .sync_status(actor.dealer, site.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::sync_pb(&status)))
    }

    async fn issue_agent_token(
        &self,
        request: Request<pb::IssueAgentTokenRequest>,
    ) -> Res<pb::IssueAgentTokenResponse> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "issuing an agent token")?;
        let site = site_name("site", &request.get_ref().site)?;
        let token = self
            .store
            .agent_token_issue(&actor, site.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::IssueAgentTokenResponse { token }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Res<pb::ListEventsResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = site_name("parent", &req.parent)?;
        let list = format!("ListEvents sites/{}", parent.site);
        let (after, limit) = page_cursor(&list, req.page_size, &req.page_token)?;
        let events = self
            .store
            .event_list(actor.dealer, Some(parent.site), after, limit + 1)
            .await
            .map_err(store_status)?;
        let (events, next_page_token) = page_split(&list, events, limit, |e| e.id.to_string());
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(res::event_pb).collect(),
            next_page_token,
        }))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Res<Self::WatchEventsStream> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let site = if req.parent == "sites/-" {
            None
        } else {
            Some(site_name("parent", &req.parent)?.site)
        };
        if req.after_cursor < 0 {
            return Err(Status::invalid_argument(
                "after_cursor must not be negative",
            ));
        }
        // Check access (and the site) before the stream starts.
        self.store
            .event_list(actor.dealer, site, req.after_cursor, 1)
            .await
            .map_err(store_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let store = self.store.clone();
        let mut bell = self.bell.subscribe();
        let shutdown = self.shutdown.clone();
        let mut cursor = req.after_cursor;
        tokio::spawn(async move {
            // Other replicas store events too: re-check on a timer as well as on the bell.
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                match store.event_list(actor.dealer, site, cursor, 100).await {
                    Ok(events) => {
                        let more = events.len() == 100;
                        for e in &events {
                            if tx.send(Ok(res::event_pb(e))).await.is_err() {
                                return;
                            }
                            cursor = e.id;
                        }
                        if more {
                            continue;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                }
                tokio::select! {
                    // cancel-safe: a token.
                    _ = shutdown.cancelled() => return,
                    // cancel-safe: resolves when the watcher hangs up.
                    _ = tx.closed() => return,
                    // cancel-safe: watch::changed.
                    changed = bell.changed() => if changed.is_err() { return },
                    // cancel-safe: interval ticks.
                    _ = tick.tick() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_personal_access_plan(
        &self,
        request: Request<pb::GetPersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        let actor = auth::actor(&request)?;
        let user = plan_name("name", &request.get_ref().name)?;
        let plan = self
            .store
            .personal_plan_get(actor.dealer, user.site, user.user)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::plan_pb(&plan)))
    }

    async fn update_personal_access_plan(
        &self,
        request: Request<pb::UpdatePersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        let actor = auth::actor(&request)?;
        let req = request.into_inner();
        let plan = required("plan", req.plan.as_ref())?;
        let user = plan_name("plan.name", &plan.name)?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("access_points", !plan.access_points.is_empty()),
                ("schedule", plan.schedule.is_some()),
            ],
        )?;
        let mut patch = store::PlanPatch::default();
        for p in &paths {
            match p.as_str() {
                "access_points" => {
                    let mut ids = Vec::new();
                    for (i, n) in plan.access_points.iter().enumerate() {
                        let d = DeviceName::parse(n)
                            .map_err(|e| name_status(&format!("plan.access_points[{i}]"), e))?;
                        if d.site != user.site {
                            return Err(Status::invalid_argument(format!(
                                "plan.access_points[{i}] names a device of another site"
                            )));
                        }
                        // A repeated name means the same device once.
                        if !ids.contains(&d.device) {
                            ids.push(d.device);
                        }
                    }
                    patch.access_points = Some(ids);
                }
                _ => {
                    patch.schedule = Some(
                        plan.schedule
                            .as_ref()
                            .map(|s| fields::schedule("plan.schedule", s))
                            .transpose()?,
                    )
                }
            }
        }
        let updated = self
            .store
            .personal_plan_update(&actor, user.site, user.user, &patch, &plan.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(user.site);
        Ok(Response::new(res::plan_pb(&updated)))
    }

    async fn clear_personal_access_plan(
        &self,
        request: Request<pb::ClearPersonalAccessPlanRequest>,
    ) -> Res<pb::PersonalAccessPlan> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let user = plan_name("name", &req.name)?;
        let cleared = self
            .store
            .personal_plan_clear(&actor, user.site, user.user, &req.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(user.site);
        Ok(Response::new(res::plan_pb(&cleared)))
    }

    async fn create_access_plan(
        &self,
        request: Request<pb::CreateAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "creating an access plan")?;
        let req = request.into_inner();
        let parent = site_name("parent", &req.parent)?;
        let plan = required("plan", req.plan.as_ref())?;
        let mut fields = access_plan_fields(
            parent.site,
            plan,
            &["display_name", "devices", "members", "schedule"],
        )?;
        fields.display_name = Some(fields::display_name(
            "plan.display_name",
            &plan.display_name,
        )?);
        let key = self.request_key("CreateAccessPlan", &req.request_id, &req)?;
        let created = self
            .store
            .access_plan_create(&actor, parent.site, &fields, key.as_ref())
            .await
            .map_err(store_status)?;
        self.hub.poke(parent.site);
        Ok(Response::new(res::access_plan_pb(&created)))
    }

    async fn get_access_plan(
        &self,
        request: Request<pb::GetAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        let actor = auth::actor(&request)?;
        let (site, id) = access_plan_name("name", &request.get_ref().name)?;
        let plan = self
            .store
            .access_plan_get(actor.dealer, site, id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(res::access_plan_pb(&plan)))
    }

    async fn list_access_plans(
        &self,
        request: Request<pb::ListAccessPlansRequest>,
    ) -> Res<pb::ListAccessPlansResponse> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let parent = site_name("parent", &req.parent)?;
        let (plans, next_page_token) = list_page(
            &format!("ListAccessPlans sites/{}", parent.site),
            req.page_size,
            &req.page_token,
            |p: &store::AccessPlan| p.id.to_string(),
            |p| self.store.access_plan_list(actor.dealer, parent.site, p),
        )
        .await?;
        Ok(Response::new(pb::ListAccessPlansResponse {
            plans: plans.iter().map(res::access_plan_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_access_plan(
        &self,
        request: Request<pb::UpdateAccessPlanRequest>,
    ) -> Res<pb::StandardAccessPlan> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "changing an access plan")?;
        let req = request.into_inner();
        let plan = required("plan", req.plan.as_ref())?;
        let (site, id) = access_plan_name("plan.name", &plan.name)?;
        let paths = mask_paths(
            req.update_mask.as_ref(),
            &[
                ("display_name", !plan.display_name.is_empty()),
                ("devices", !plan.devices.is_empty()),
                ("members", !plan.members.is_empty()),
                ("schedule", plan.schedule.is_some()),
            ],
        )?;
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let fields = access_plan_fields(site, plan, &paths)?;
        let updated = self
            .store
            .access_plan_update(&actor, site, id, &fields, &plan.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(site);
        Ok(Response::new(res::access_plan_pb(&updated)))
    }

    async fn delete_access_plan(&self, request: Request<pb::DeleteAccessPlanRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "deleting an access plan")?;
        let req = request.get_ref();
        if PersonalPlanName::looks_like(&req.name) {
            return Err(Status::failed_precondition(
                "a personal access plan cannot be deleted; clear it with ClearPersonalAccessPlan",
            ));
        }
        let (site, id) = access_plan_name("name", &req.name)?;
        self.store
            .access_plan_delete(&actor, site, id, &req.etag)
            .await
            .map_err(store_status)?;
        self.hub.poke(site);
        Ok(Response::new(()))
    }

    async fn put_holiday(&self, request: Request<pb::PutHolidayRequest>) -> Res<pb::Holiday> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "setting a holiday")?;
        let req = request.into_inner();
        let holiday = required("holiday", req.holiday.as_ref())?;
        let (site, day) = holiday_name("holiday.name", &holiday.name)?;
        let mut plans = Vec::new();
        for (i, p) in holiday.plans.iter().enumerate() {
            let (plan_site, id) = access_plan_name(&format!("holiday.plans[{i}]"), p)?;
            if plan_site != site {
                return Err(Status::invalid_argument(format!(
                    "holiday.plans[{i}] is a plan of another site"
                )));
            }
            plans.push(id);
        }
        let put = self
            .store
            .holiday_put(
                &actor,
                &store::Holiday {
                    site,
                    day,
                    display_name: if holiday.display_name.is_empty() {
                        "Holiday".into()
                    } else {
                        fields::display_name("holiday.display_name", &holiday.display_name)?
                    },
                    plans,
                },
            )
            .await
            .map_err(store_status)?;
        self.hub.poke(site);
        Ok(Response::new(res::holiday_pb(&put)))
    }

    async fn list_holidays(
        &self,
        request: Request<pb::ListHolidaysRequest>,
    ) -> Res<pb::ListHolidaysResponse> {
        let actor = auth::actor(&request)?;
        let parent = site_name("parent", &request.get_ref().parent)?;
        let holidays = self
            .store
            .holiday_list(actor.dealer, parent.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListHolidaysResponse {
            holidays: holidays.iter().map(res::holiday_pb).collect(),
        }))
    }

    async fn delete_holiday(&self, request: Request<pb::DeleteHolidayRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "deleting a holiday")?;
        let (site, day) = holiday_name("name", &request.get_ref().name)?;
        self.store
            .holiday_delete(&actor, site, day)
            .await
            .map_err(store_status)?;
        self.hub.poke(site);
        Ok(Response::new(()))
    }

    async fn lockdown_doors(&self, request: Request<pb::LockdownDoorsRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "locking down doors")?;
        let site = site_name("site", &request.get_ref().site)?;
        self.store
            .site_lockdown_set(&actor, site.site, true)
            .await
            .map_err(store_status)?;
        self.hub.poke(site.site);
        self.bell.ring();
        Ok(Response::new(()))
    }

    async fn release_lockdown(&self, request: Request<pb::ReleaseLockdownRequest>) -> Res<()> {
        let actor = auth::actor(&request)?;
        installer_only(&actor, "releasing a lockdown")?;
        let site = site_name("site", &request.get_ref().site)?;
        self.store
            .site_lockdown_set(&actor, site.site, false)
            .await
            .map_err(store_status)?;
        self.hub.poke(site.site);
        self.bell.ring();
        Ok(Response::new(()))
    }

    async fn list_local_codes(
        &self,
        request: Request<pb::ListLocalCodesRequest>,
    ) -> Res<pb::ListLocalCodesResponse> {
        let actor = auth::actor(&request)?;
        let parent = site_name("parent", &request.get_ref().parent)?;
        let codes = self
            .store
            .local_code_list(actor.dealer, parent.site)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListLocalCodesResponse {
            local_codes: codes.iter().map(res::local_code_pb).collect(),
        }))
    }

    async fn claim_local_code(
        &self,
        request: Request<pb::ClaimLocalCodeRequest>,
    ) -> Res<pb::Credential> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let (device, slot) = local_code_name("name", &req.name)?;
        let user = UserName::parse(&req.user).map_err(|e| name_status("user", e))?;
        if user.site != device.site {
            return Err(Status::invalid_argument(
                "user is not a user of the local code's site",
            ));
        }
        let partitions = req
            .panel_partitions
            .iter()
            .map(|p| fields::partition("panel_partitions", *p))
            .collect::<Result<Vec<_>, _>>()?;
        let credential = self
            .store
            .local_code_claim(
                &actor,
                device.site,
                device.device,
                slot,
                user.user,
                &partitions,
            )
            .await
            .map_err(store_status)?;
        self.hub.poke(device.site);
        Ok(Response::new(res::credential_pb(&credential)))
    }

    async fn remove_local_code(
        &self,
        request: Request<pb::RemoveLocalCodeRequest>,
    ) -> Res<pb::LocalCode> {
        let actor = auth::actor(&request)?;
        let (device, slot) = local_code_name("name", &request.get_ref().name)?;
        let local = self
            .store
            .local_code_remove(&actor, device.site, device.device, slot)
            .await
            .map_err(store_status)?;
        self.hub.poke(device.site);
        Ok(Response::new(res::local_code_pb(&local)))
    }

    async fn resolve_drift(
        &self,
        request: Request<pb::ResolveDriftRequest>,
    ) -> Res<pb::Credential> {
        let actor = auth::actor(&request)?;
        let req = request.get_ref();
        let credential =
            CredentialName::parse(&req.credential).map_err(|e| name_status("credential", e))?;
        let device = DeviceName::parse(&req.device).map_err(|e| name_status("device", e))?;
        if device.site != credential.site {
            return Err(Status::invalid_argument(
                "device is not a device of the credential's site",
            ));
        }
        let adopt = match pb::resolve_drift_request::Resolution::try_from(req.resolution) {
            Ok(pb::resolve_drift_request::Resolution::Reapply) => false,
            Ok(pb::resolve_drift_request::Resolution::Adopt) => true,
            _ => {
                return Err(Status::invalid_argument(
                    "resolution must be REAPPLY or ADOPT",
                ));
            }
        };
        let updated = self
            .store
            .drift_resolve(
                &actor,
                credential.site,
                credential.user,
                credential.credential,
                device.device,
                adopt,
            )
            .await
            .map_err(store_status)?;
        self.hub.poke(credential.site);
        Ok(Response::new(res::credential_pb(&updated)))
    }
}

/// The fields of `paths` from a plan message.
fn access_plan_fields(
    site: uuid::Uuid,
    plan: &pb::StandardAccessPlan,
    paths: &[&str],
) -> Result<store::AccessPlanFields, Status> {
    let mut fields = store::AccessPlanFields::default();
    for p in paths {
        match *p {
            "display_name" => {
                fields.display_name = Some(fields::display_name(
                    "plan.display_name",
                    &plan.display_name,
                )?)
            }
            "devices" => {
                let mut ids = Vec::new();
                for (i, n) in plan.devices.iter().enumerate() {
                    let d = DeviceName::parse(n)
                        .map_err(|e| name_status(&format!("plan.devices[{i}]"), e))?;
                    if d.site != site {
                        return Err(Status::invalid_argument(format!(
                            "plan.devices[{i}] is a device of another site"
                        )));
                    }
                    if !ids.contains(&d.device) {
                        ids.push(d.device);
                    }
                }
                fields.devices = Some(ids);
            }
            "members" => {
                let mut ids = Vec::new();
                for (i, n) in plan.members.iter().enumerate() {
                    let u = UserName::parse(n)
                        .map_err(|e| name_status(&format!("plan.members[{i}]"), e))?;
                    if u.site != site {
                        return Err(Status::invalid_argument(format!(
                            "plan.members[{i}] is a user of another site"
                        )));
                    }
                    if !ids.contains(&u.user) {
                        ids.push(u.user);
                    }
                }
                fields.members = Some(ids);
            }
            _ => {
                fields.schedule = Some(
                    plan.schedule
                        .as_ref()
                        .map(|s| fields::schedule("plan.schedule", s))
                        .transpose()?,
                )
            }
        }
    }
    Ok(fields)
}
