//! A demo site built through the public API, and helpers to look at it.

use keyplane_core::DeviceModel;
use keyplane_devices::SimulatedDevice;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{Admin, TempDir, TestAgent, TestServer, eventually};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a sync may take on a loaded 2-core CI machine.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// A site with partition 1, a panel, a front-door lock and user Alice.
pub struct Site {
    pub server: TestServer,
    pub admin: Admin,
    pub site: String,
    pub panel: pb::Device,
    pub lock: pb::Device,
    pub alice: String,
    pub agent_token: String,
    pub token: String,
    pub dir: TempDir,
}

impl Site {
    pub async fn new() -> anyhow::Result<Site> {
        Self::with_lock_model("zwave-lock-30").await
    }

    pub async fn with_lock_model(lock_model: &str) -> anyhow::Result<Site> {
        Self::on_server(TestServer::start().await?, lock_model).await
    }

    /// The demo site on a server that serves TLS with its own test CA.
    pub async fn tls() -> anyhow::Result<Site> {
        Self::on_server(TestServer::start_tls().await?, "zwave-lock-30").await
    }

    pub async fn on_server(server: TestServer, lock_model: &str) -> anyhow::Result<Site> {
        let token = server.dealer("Dealer One").await?;
        let mut admin = server.admin(Some(&token)).await?;
        let site = create_site(&mut admin, "Alice's house", "Europe/Paris").await?;
        create_partition(&mut admin, &site, 1, "House").await?;
        let panel = create_device(&mut admin, &site, "Panel", "vista-128bpt").await?;
        let lock = create_device(&mut admin, &site, "Front door", lock_model).await?;
        let alice = create_user_with(&mut admin, &site, "Alice", &[(1, pb::Level::Master)]).await?;
        let agent_token = server.agent_token(&mut admin, &site).await?;
        Ok(Site {
            server,
            admin,
            site,
            panel,
            lock,
            alice,
            agent_token,
            token,
            dir: TempDir::new("e2e")?,
        })
    }

    pub fn start_agent(&self) -> TestAgent {
        TestAgent::start_config(
            self.agent_config(),
            self.dir.path(),
            Box::new(keyplane_agent::SimulatorFactory::new(
                self.dir.path().join("devices"),
            )),
        )
    }

    /// The config [`Site::start_agent`] uses (trusting the server's CA under TLS).
    pub fn agent_config(&self) -> keyplane_agent::AgentConfig {
        let mut config = TestAgent::config(
            &self.server.url,
            &self.site,
            &self.agent_token,
            self.dir.path(),
        );
        config.server_ca_file = self.server.pki.as_ref().map(|p| p.ca_cert_file());
        config
    }

    /// The simulated device behind `device`, opened from disk.
    pub fn sim(&self, device: &pb::Device) -> anyhow::Result<SimulatedDevice> {
        let model = DeviceModel::find(&device.model)
            .ok_or_else(|| anyhow::anyhow!("model {}", device.model))?;
        Ok(SimulatedDevice::open(
            &self.dir.path().join("devices"),
            &device.name,
            model,
        )?)
    }

    /// What the simulated device holds, slot -> code.
    pub fn slots(&self, device: &pb::Device) -> anyhow::Result<BTreeMap<u16, String>> {
        Ok(self.sim(device)?.slots())
    }

    pub async fn credential(
        &mut self,
        user: &str,
        pin: &str,
        scope: pb::CredentialScope,
    ) -> Result<pb::Credential, tonic::Status> {
        self.admin
            .create_credential(pb::CreateCredentialRequest {
                parent: user.to_owned(),
                credential: Some(pb::Credential {
                    display_name: "code".into(),
                    pin: pin.into(),
                    scope: Some(scope),
                    ..Default::default()
                }),
                request_id: String::new(),
                generate_pin: false,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Sets the site's local-code policy.
    pub async fn set_policy(&mut self, policy: pb::LocalCodePolicy) -> anyhow::Result<()> {
        self.admin
            .update_site(pb::UpdateSiteRequest {
                site: Some(pb::Site {
                    name: self.site.clone(),
                    local_code_policy: policy as i32,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["local_code_policy".into()],
                }),
            })
            .await?;
        Ok(())
    }

    pub async fn sync_status(&mut self) -> anyhow::Result<pb::SyncStatus> {
        Ok(self
            .admin
            .get_sync_status(pb::GetSyncStatusRequest {
                name: format!("{}/syncStatus", self.site),
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    /// Waits until every device reports the site's head revision applied.
    pub async fn wait_synced(&mut self) -> anyhow::Result<pb::SyncStatus> {
        self.wait_synced_within(SYNC_TIMEOUT).await
    }

    /// Like [`Site::wait_synced`], with a bound for a large table (each device's
    /// read-back of every slot is reported before its ack).
    pub async fn wait_synced_within(&mut self, bound: Duration) -> anyhow::Result<pb::SyncStatus> {
        wait_applied_at_head(&self.admin, &self.site, bound).await
    }
}

pub fn panel_scope(partitions: &[i32]) -> pb::CredentialScope {
    pb::CredentialScope {
        panel_partitions: partitions.to_vec(),
        ..Default::default()
    }
}

pub fn lock_scope(locks: &[&pb::Device]) -> pb::CredentialScope {
    pb::CredentialScope {
        locks: locks.iter().map(|d| d.name.clone()).collect(),
        ..Default::default()
    }
}

pub async fn create_device(
    admin: &mut Admin,
    site: &str,
    name: &str,
    model: &str,
) -> anyhow::Result<pb::Device> {
    Ok(admin
        .create_device(pb::CreateDeviceRequest {
            parent: site.to_owned(),
            device: Some(pb::Device {
                display_name: name.into(),
                model: model.into(),
                // A panel spans partitions; locks and doors belong to one.
                partition: if DeviceModel::find(model)
                    .is_some_and(|m| m.kind == keyplane_core::DeviceKind::Panel)
                {
                    0
                } else {
                    1
                },
                perimeter: true,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner())
}

/// A user who is operator A in partition 1.
/// A new site of the admin's dealer; its name.
/// Waits until `site` has devices and every one reports the head revision applied.
pub async fn wait_applied_at_head(
    admin: &Admin,
    site: &str,
    bound: Duration,
) -> anyhow::Result<pb::SyncStatus> {
    let name = format!("{site}/syncStatus");
    eventually("all devices applied at head", bound, || {
        let mut admin = admin.clone();
        let name = name.clone();
        async move {
            let s = admin
                .get_sync_status(pb::GetSyncStatusRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let done = !s.devices.is_empty()
                && s.devices
                    .iter()
                    .all(|d| d.in_sync && d.applied_revision == s.desired_revision);
            Ok(done.then_some(s))
        }
    })
    .await
}

/// Creates partition `number` of `site`.
pub async fn create_partition(
    admin: &mut Admin,
    site: &str,
    number: i32,
    display_name: &str,
) -> anyhow::Result<pb::Partition> {
    Ok(admin
        .create_partition(pb::CreatePartitionRequest {
            parent: site.to_owned(),
            partition: Some(pb::Partition {
                number,
                display_name: display_name.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner())
}

pub async fn create_site(
    admin: &mut Admin,
    display_name: &str,
    time_zone: &str,
) -> anyhow::Result<String> {
    Ok(admin
        .create_site(pb::CreateSiteRequest {
            site: Some(pb::Site {
                display_name: display_name.into(),
                time_zone: time_zone.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .name)
}

pub async fn create_user(admin: &mut Admin, site: &str, name: &str) -> anyhow::Result<String> {
    create_user_with(admin, site, name, &[(1, pb::Level::OperatorA)]).await
}

/// A user with the given level per partition.
pub async fn create_user_with(
    admin: &mut Admin,
    site: &str,
    name: &str,
    levels: &[(i32, pb::Level)],
) -> anyhow::Result<String> {
    Ok(admin
        .create_user(pb::CreateUserRequest {
            parent: site.to_owned(),
            user: Some(pb::User {
                display_name: name.into(),
                authorities: levels
                    .iter()
                    .map(|(p, l)| pb::PartitionAuthority {
                        partition: *p,
                        level: *l as i32,
                    })
                    .collect(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .name)
}

/// The slot a credential got on `device`.
pub fn slot_on(credential: &pb::Credential, device: &pb::Device) -> Option<u16> {
    credential
        .slots
        .iter()
        .find(|s| s.device == device.name)
        .and_then(|s| u16::try_from(s.slot).ok())
}

/// An update mask naming `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// The id at the end of a resource name (`sites/{id}`, `…/devices/{id}`, …).
pub fn id_of(name: &str) -> anyhow::Result<uuid::Uuid> {
    Ok(uuid::Uuid::parse_str(
        name.rsplit('/').next().unwrap_or_default(),
    )?)
}

/// Waits until `agent` has read `device` back once more and then completed two
/// more passes: whatever the agent would do about what the device holds now is done.
/// (How tests say "nothing happened" without sleeping.)
pub async fn after_a_read_back(
    s: &Site,
    agent: &keyplane_testkit::server::TestAgent,
    device: &pb::Device,
) -> anyhow::Result<()> {
    let reads = s.sim(device)?.table_reads();
    keyplane_testkit::server::eventually(
        "the agent reads the device back",
        SYNC_TIMEOUT,
        || async { Ok((s.sim(device)?.table_reads() > reads).then_some(())) },
    )
    .await?;
    agent.passes(2).await
}
