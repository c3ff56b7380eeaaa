//! `keyplaned demo-seed`: creates a demo site through the public API, as a dealer's
//! back office would, so `cargo xtask dev` has something to show.

use keyplane_proto::v1 as pb;
use keyplane_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// What the demo created.
#[derive(Debug)]
pub struct Demo {
    /// `sites/{id}`.
    pub site: String,
    /// Panel, front lock, back door.
    pub devices: Vec<pb::Device>,
    /// The demo user.
    pub user: String,
    /// Agent token for the site.
    pub agent_token: String,
}

fn authed<T>(token: &str, msg: T) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    Ok(req)
}

/// Seeds a site with a panel, a lock and a door (partition 1) and user Alice holding one
/// code for the panel and another for the lock.
pub async fn seed(server: &str, token: &str) -> anyhow::Result<Demo> {
    let mut admin =
        AdminServiceClient::new(Channel::from_shared(server.to_owned())?.connect().await?);
    let site = admin
        .create_site(authed(
            token,
            pb::CreateSiteRequest {
                site: Some(pb::Site {
                    display_name: "Demo house".into(),
                    time_zone: "Europe/Paris".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        )?)
        .await?
        .into_inner();
    admin
        .create_partition(authed(
            token,
            pb::CreatePartitionRequest {
                parent: site.name.clone(),
                partition: Some(pb::Partition {
                    number: 1,
                    display_name: "House".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        )?)
        .await?;
    let mut devices = Vec::new();
    for (name, model) in [
        ("Panel", "vista-128bpt"),
        ("Front door lock", "zwave-lock-30"),
        ("Garage door", "door-1000"),
    ] {
        let d = admin
            .create_device(authed(
                token,
                pb::CreateDeviceRequest {
                    parent: site.name.clone(),
                    device: Some(pb::Device {
                        display_name: name.into(),
                        model: model.into(),
                        // A panel spans partitions; locks and doors belong to one.
                        partition: if model.starts_with("vista") { 0 } else { 1 },
                        perimeter: true,
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
            )?)
            .await?
            .into_inner();
        devices.push(d);
    }
    let user = admin
        .create_user(authed(
            token,
            pb::CreateUserRequest {
                parent: site.name.clone(),
                user: Some(pb::User {
                    display_name: "Alice".into(),
                    authorities: vec![pb::PartitionAuthority {
                        partition: 1,
                        level: pb::Level::Master as i32,
                    }],
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        )?)
        .await?
        .into_inner();
    for (label, pin, scope) in [
        (
            "Panel code",
            "4821",
            pb::CredentialScope {
                panel_partitions: vec![1],
                ..Default::default()
            },
        ),
        (
            "Front door code",
            "9930",
            pb::CredentialScope {
                locks: vec![devices[1].name.clone()],
                ..Default::default()
            },
        ),
    ] {
        admin
            .create_credential(authed(
                token,
                pb::CreateCredentialRequest {
                    parent: user.name.clone(),
                    credential: Some(pb::Credential {
                        display_name: label.into(),
                        pin: pin.into(),
                        scope: Some(scope),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                    generate_pin: false,
                },
            )?)
            .await?;
    }
    let agent_token = admin
        .issue_agent_token(authed(
            token,
            pb::IssueAgentTokenRequest {
                site: site.name.clone(),
            },
        )?)
        .await?
        .into_inner()
        .token;
    Ok(Demo {
        site: site.name,
        devices,
        user: user.name,
        agent_token,
    })
}
