//! Every change an agent must hear of advances the site's revision, and nothing else
//! does: each mutating AdminService call is made in turn on one site, and what an agent
//! would receive (a snapshot read over a real Sync stream) is compared before and after.
//! Also: the AUTHORITATIVE switch, DeleteDevice on a plan's door, and the PIN key.

use crate::fixture::{Site, create_device, create_user_with, id_of, lock_scope, mask, panel_scope};
use keyplane_core::pin::Pin;
use keyplane_proto::v1 as pb;
use keyplane_proto::v1::agent_service_client::AgentServiceClient;
use keyplane_store::{Observed, ObservedState};
use keyplane_testkit::server::{TestServer, eventually};
use std::future::Future;
use std::time::Duration;
use tonic::Code;

/// What a new agent of the site would be sent, read over a real Sync stream.
pub async fn agent_snapshot(
    server: &TestServer,
    site: &str,
    agent_token: &str,
) -> anyhow::Result<pb::DesiredSnapshot> {
    let mut client = AgentServiceClient::new(server.channel().await?);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            site: site.to_owned(),
            applied_revision: 0,
            ..Default::default()
        })),
    })
    .await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {agent_token}").parse()?);
    let mut inbound = client.sync(request).await?.into_inner();
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the stream closed before the snapshot"))?;
    drop(tx);
    match first.msg {
        Some(pb::server_message::Msg::Snapshot(s)) => Ok(s),
        _ => anyhow::bail!("the first message to a new agent was not a snapshot"),
    }
}

struct Probe<'a> {
    site: &'a Site,
}

impl Probe<'_> {
    async fn view(&self) -> anyhow::Result<pb::DesiredSnapshot> {
        agent_snapshot(&self.site.server, &self.site.site, &self.site.agent_token).await
    }

    /// Runs `call`, then checks that the revision advanced exactly when what an agent
    /// receives changed, and that this matches what the table expects.
    async fn check<T>(
        &self,
        what: &str,
        expect_change: bool,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> anyhow::Result<T> {
        let before = self.view().await?;
        let out = call
            .await
            .map_err(|s| anyhow::anyhow!("{what}: {:?} {}", s.code(), s.message()))?;
        let after = self.view().await?;
        let advanced = after.revision > before.revision;
        let changed = pb::DesiredSnapshot {
            revision: 0,
            ..before
        } != pb::DesiredSnapshot {
            revision: 0,
            ..after.clone()
        };
        assert_eq!(
            advanced, changed,
            "{what}: revision advanced: {advanced}, what an agent receives changed: {changed}"
        );
        assert_eq!(
            changed, expect_change,
            "{what}: expected the agent's view to change: {expect_change}"
        );
        Ok(out)
    }

    /// Records what an agent would report for `device` (its whole observed table).
    async fn observe(&self, device: &pb::Device, slots: &[(u16, ObservedState, &str)]) {
        let site = id_of(&self.site.site).expect("site id");
        let device = id_of(&device.name).expect("device id");
        let slots: Vec<Observed> = slots
            .iter()
            .map(|(slot, state, pin)| Observed {
                slot: *slot,
                state: *state,
                pin: Pin::parse(pin).ok(),
            })
            .collect();
        self.site
            .server
            .store
            .observed_record(site, device, &slots)
            .await
            .expect("observed_record");
    }
}

#[tokio::test]
async fn the_revision_advances_exactly_when_what_an_agent_receives_changes() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let admin = s.admin.clone();
    let site = s.site.clone();
    let (panel, lock) = (s.panel.clone(), s.lock.clone());
    let p = Probe { site: &s };
    let a = || admin.clone();

    let site_pb = |f: fn(&mut pb::Site)| {
        let mut v = pb::Site {
            name: site.clone(),
            ..Default::default()
        };
        f(&mut v);
        v
    };
    p.check(
        "UpdateSite display_name",
        false,
        a().update_site(pb::UpdateSiteRequest {
            site: Some(site_pb(|v| v.display_name = "Renamed".into())),
            update_mask: mask(&["display_name"]),
        }),
    )
    .await?;
    p.check(
        "UpdateSite time_zone",
        true,
        a().update_site(pb::UpdateSiteRequest {
            site: Some(site_pb(|v| v.time_zone = "America/New_York".into())),
            update_mask: mask(&["time_zone"]),
        }),
    )
    .await?;
    p.check(
        "CreatePartition",
        false,
        a().create_partition(pb::CreatePartitionRequest {
            parent: site.clone(),
            partition: Some(pb::Partition {
                number: 2,
                display_name: "Garage".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        }),
    )
    .await?;
    p.check(
        "UpdatePartition",
        false,
        a().update_partition(pb::UpdatePartitionRequest {
            partition: Some(pb::Partition {
                name: format!("{site}/partitions/2"),
                display_name: "Workshop".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        }),
    )
    .await?;
    let door = p
        .check("CreateDevice", true, async {
            let mut admin = a();
            create_device(&mut admin, &site, "Office door", "door-1000")
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))
        })
        .await?;
    p.check(
        "UpdateDevice display_name",
        false,
        a().update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: door.name.clone(),
                display_name: "Back office door".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        }),
    )
    .await?;
    let bob = p
        .check("CreateUser", false, async {
            let mut admin = a();
            create_user_with(&mut admin, &site, "Bob", &[(1, pb::Level::Master)])
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))
        })
        .await?;
    let user_update = |user: pb::User, paths: &[&str]| pb::UpdateUserRequest {
        user: Some(user),
        update_mask: mask(paths),
    };
    p.check(
        "UpdateUser display_name",
        false,
        a().update_user(user_update(
            pb::User {
                name: bob.clone(),
                display_name: "Robert".into(),
                ..Default::default()
            },
            &["display_name"],
        )),
    )
    .await?;
    let create =
        |parent: &str, pin: &str, scope: pb::CredentialScope| pb::CreateCredentialRequest {
            parent: parent.to_owned(),
            credential: Some(pb::Credential {
                display_name: "code".into(),
                pin: pin.into(),
                scope: Some(scope),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        };
    let bob_panel = p
        .check(
            "CreateCredential (panel)",
            true,
            a().create_credential(create(&bob, "5827", panel_scope(&[1]))),
        )
        .await?
        .into_inner();
    p.check(
        "UpdateCredential display_name",
        false,
        a().update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: bob_panel.name.clone(),
                display_name: "Keypad".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        }),
    )
    .await?;
    p.check(
        "UpdateCredential pin",
        true,
        a().update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: bob_panel.name.clone(),
                pin: "6183".into(),
                ..Default::default()
            }),
            update_mask: mask(&["pin"]),
        }),
    )
    .await?;
    p.check(
        "UpdateUser open_close_reporting (holds a panel code)",
        true,
        a().update_user(user_update(
            pb::User {
                name: bob.clone(),
                open_close_reporting: true,
                ..Default::default()
            },
            &["open_close_reporting"],
        )),
    )
    .await?;
    p.check(
        "UpdateUser level in the code's partition",
        true,
        a().update_user(user_update(
            pb::User {
                name: bob.clone(),
                authorities: vec![pb::PartitionAuthority {
                    partition: 1,
                    level: pb::Level::Manager as i32,
                }],
                ..Default::default()
            },
            &["authorities"],
        )),
    )
    .await?;
    p.check(
        "UpdateUser level in a partition none of the codes is scoped to",
        false,
        a().update_user(user_update(
            pb::User {
                name: bob.clone(),
                authorities: vec![
                    pb::PartitionAuthority {
                        partition: 1,
                        level: pb::Level::Manager as i32,
                    },
                    pb::PartitionAuthority {
                        partition: 2,
                        level: pb::Level::OperatorA as i32,
                    },
                ],
                ..Default::default()
            },
            &["authorities"],
        )),
    )
    .await?;
    p.check(
        "UpdateDevice perimeter",
        false,
        a().update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                name: door.name.clone(),
                perimeter: true,
                ..Default::default()
            }),
            update_mask: mask(&["perimeter"]),
        }),
    )
    .await?;
    let bob_lock = p
        .check(
            "CreateCredential (lock)",
            true,
            a().create_credential(create(&bob, "7394", lock_scope(&[&lock]))),
        )
        .await?
        .into_inner();
    p.check(
        "UpdatePersonalAccessPlan",
        true,
        a().update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: format!("{bob}/personalAccessPlan"),
                access_points: vec![lock.name.clone(), panel.name.clone()],
                schedule: Some(pb::Schedule {
                    windows: vec![pb::TimeWindow {
                        days: vec![pb::DayOfWeek::Monday as i32],
                        start_time: "08:00".into(),
                        end_time: "18:00".into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["access_points", "schedule"]),
        }),
    )
    .await?;
    p.check(
        "ClearPersonalAccessPlan",
        true,
        a().clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
            name: format!("{bob}/personalAccessPlan"),
            etag: String::new(),
        }),
    )
    .await?;
    p.check(
        "CreateCredential (door)",
        true,
        a().create_credential(create(
            &bob,
            "2749",
            pb::CredentialScope {
                doors: vec![door.name.clone()],
                ..Default::default()
            },
        )),
    )
    .await?;
    let weekdays = pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: vec![pb::DayOfWeek::Tuesday as i32],
            start_time: "07:00".into(),
            end_time: "19:00".into(),
        }],
        ..Default::default()
    };
    let plan = p
        .check(
            "CreateAccessPlan",
            true,
            a().create_access_plan(pb::CreateAccessPlanRequest {
                parent: site.clone(),
                plan: Some(pb::StandardAccessPlan {
                    display_name: "Staff".into(),
                    devices: vec![door.name.clone()],
                    members: vec![bob.clone()],
                    schedule: Some(weekdays.clone()),
                    ..Default::default()
                }),
                request_id: String::new(),
            }),
        )
        .await?
        .into_inner();
    p.check(
        "UpdateAccessPlan display_name",
        false,
        a().update_access_plan(pb::UpdateAccessPlanRequest {
            plan: Some(pb::StandardAccessPlan {
                name: plan.name.clone(),
                display_name: "Everyone".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        }),
    )
    .await?;
    p.check(
        "UpdateAccessPlan schedule",
        true,
        a().update_access_plan(pb::UpdateAccessPlanRequest {
            plan: Some(pb::StandardAccessPlan {
                name: plan.name.clone(),
                schedule: Some(pb::Schedule {
                    windows: vec![pb::TimeWindow {
                        days: vec![pb::DayOfWeek::Wednesday as i32],
                        start_time: "07:00".into(),
                        end_time: "19:00".into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["schedule"]),
        }),
    )
    .await?;
    let holiday = format!("{site}/holidays/2026-12-25");
    p.check(
        "PutHoliday",
        true,
        a().put_holiday(pb::PutHolidayRequest {
            holiday: Some(pb::Holiday {
                name: holiday.clone(),
                display_name: "Christmas".into(),
                plans: Vec::new(),
            }),
        }),
    )
    .await?;
    p.check(
        "DeleteHoliday",
        true,
        a().delete_holiday(pb::DeleteHolidayRequest { name: holiday }),
    )
    .await?;
    p.check(
        "LockdownDoors",
        true,
        a().lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() }),
    )
    .await?;
    p.check(
        "ReleaseLockdown",
        true,
        a().release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() }),
    )
    .await?;
    p.check(
        "IssueAgentToken",
        false,
        a().issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() }),
    )
    .await
    .map(|_| ())
    .ok();
    // The token was re-issued: probe with the new one from here on.
    let token = s.server.agent_token(&mut a(), &site).await?;
    s.agent_token = token;
    let p = Probe { site: &s };

    // Codes programmed at the lock, as the agent reports them.
    let lock_slot = |c: &pb::Credential| {
        c.slots
            .iter()
            .find(|x| x.device == lock.name)
            .map(|x| x.slot as u16)
    };
    let bob_lock_slot = lock_slot(&bob_lock).ok_or_else(|| anyhow::anyhow!("no lock slot"))?;
    p.observe(&lock, &[(20, ObservedState::Foreign, "3916")])
        .await;
    p.check(
        "RemoveLocalCode",
        true,
        a().remove_local_code(pb::RemoveLocalCodeRequest {
            name: format!("{}/localCodes/20", lock.name),
        }),
    )
    .await?;
    p.observe(&lock, &[(21, ObservedState::Foreign, "8452")])
        .await;
    p.check(
        "ClaimLocalCode",
        true,
        a().claim_local_code(pb::ClaimLocalCodeRequest {
            name: format!("{}/localCodes/21", lock.name),
            user: bob.clone(),
            panel_partitions: Vec::new(),
        }),
    )
    .await?;
    p.observe(
        &lock,
        &[
            (bob_lock_slot, ObservedState::Drifted, "1593"),
            (22, ObservedState::Foreign, "6071"),
        ],
    )
    .await;
    p.check(
        "ResolveDrift REAPPLY",
        true,
        a().resolve_drift(pb::ResolveDriftRequest {
            credential: bob_lock.name.clone(),
            device: lock.name.clone(),
            resolution: pb::resolve_drift_request::Resolution::Reapply as i32,
        }),
    )
    .await?;
    p.check(
        "UpdateSite local_code_policy AUTHORITATIVE (a local code is reported)",
        true,
        a().update_site(pb::UpdateSiteRequest {
            site: Some(site_pb(|v| {
                v.local_code_policy = pb::LocalCodePolicy::Authoritative as i32
            })),
            update_mask: mask(&["local_code_policy"]),
        }),
    )
    .await?;
    p.check(
        "UpdateSite local_code_policy PRESERVE",
        false,
        a().update_site(pb::UpdateSiteRequest {
            site: Some(site_pb(|v| {
                v.local_code_policy = pb::LocalCodePolicy::Preserve as i32
            })),
            update_mask: mask(&["local_code_policy"]),
        }),
    )
    .await?;

    // A door an access plan names is not deleted behind the plan's back.
    let refused = p
        .check("DeleteDevice (named by a plan) is refused", false, async {
            Ok(a()
                .delete_device(pb::DeleteDeviceRequest {
                    name: door.name.clone(),
                    etag: String::new(),
                })
                .await)
        })
        .await?;
    let status = refused.expect_err("a plan's door must not be deleted");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&plan.name) && status.message().contains("UpdateAccessPlan"),
        "{}",
        status.message()
    );

    p.check(
        "DeleteAccessPlan",
        true,
        a().delete_access_plan(pb::DeleteAccessPlanRequest {
            name: plan.name.clone(),
            etag: String::new(),
        }),
    )
    .await?;
    p.check(
        "DeleteCredential",
        true,
        a().delete_credential(pb::DeleteCredentialRequest {
            name: bob_panel.name.clone(),
            etag: String::new(),
        }),
    )
    .await?;
    let carol = create_user_with(&mut a(), &site, "Carol", &[(1, pb::Level::Manager)]).await?;
    p.check(
        "DeleteUser (no codes)",
        false,
        a().delete_user(pb::DeleteUserRequest {
            name: carol,
            etag: String::new(),
        }),
    )
    .await?;
    p.check(
        "DeleteUser (holds codes)",
        true,
        a().delete_user(pb::DeleteUserRequest {
            name: bob,
            etag: String::new(),
        }),
    )
    .await?;
    p.check(
        "DeleteDevice",
        true,
        a().delete_device(pb::DeleteDeviceRequest {
            name: door.name.clone(),
            etag: String::new(),
        }),
    )
    .await?;
    p.check(
        "DeletePartition",
        false,
        a().delete_partition(pb::DeletePartitionRequest {
            name: format!("{site}/partitions/2"),
            etag: String::new(),
        }),
    )
    .await?;
    Ok(())
}

/// A connected agent hears of a new time zone at once, without any other change.
#[tokio::test]
async fn a_time_zone_change_reaches_a_connected_agent() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let agent = s.start_agent();
    s.credential(&s.alice.clone(), "4821", panel_scope(&[1]))
        .await?;
    s.wait_synced().await?;
    s.admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: s.site.clone(),
                time_zone: "Asia/Tokyo".into(),
                ..Default::default()
            }),
            update_mask: mask(&["time_zone"]),
        })
        .await?;
    let journal = s.dir.path().join("state");
    eventually(
        "the agent's journal holds the new time zone",
        crate::fixture::SYNC_TIMEOUT,
        || {
            let journal = journal.clone();
            async move {
                let text = read_dir_text(&journal)?;
                Ok(text.contains("Asia/Tokyo").then_some(()))
            }
        },
    )
    .await?;
    s.wait_synced().await?;
    agent.stop().await?;
    Ok(())
}

/// Concatenated text of the regular files under `dir` (the agent's journal).
fn read_dir_text(dir: &std::path::Path) -> anyhow::Result<String> {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            out.push_str(&read_dir_text(&path)?);
        } else if let Ok(bytes) = std::fs::read(&path) {
            // The journal is a binary database whose rows are JSON text.
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    Ok(out)
}

/// Switching to AUTHORITATIVE clears codes programmed at the device at once, each
/// clearing audited, without waiting for the agent to reconnect or report again.
#[tokio::test]
async fn switching_to_authoritative_clears_local_codes_at_once() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    s.sim(&s.lock)?.program_at_keypad(9, "3916")?;
    let admin = s.admin.clone();
    let site = s.site.clone();
    eventually(
        "the hand-programmed code is a LOCAL code",
        crate::fixture::SYNC_TIMEOUT,
        || {
            let mut admin = admin.clone();
            let site = site.clone();
            async move {
                let codes = admin
                    .list_local_codes(pb::ListLocalCodesRequest { parent: site })
                    .await?
                    .into_inner()
                    .local_codes;
                Ok((codes.len() == 1).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(s.slots(&s.lock)?.get(&9).map(String::as_str), Some("3916"));
    s.set_policy(pb::LocalCodePolicy::Authoritative).await?;
    let lock = s.lock.clone();
    let dir = s.dir.path().to_owned();
    eventually(
        "the lock no longer holds the local code",
        crate::fixture::SYNC_TIMEOUT,
        || {
            let lock = lock.clone();
            let dir = dir.clone();
            async move {
                let model = keyplane_core::DeviceModel::find(&lock.model)
                    .ok_or_else(|| anyhow::anyhow!("model"))?;
                let sim = keyplane_devices::SimulatedDevice::open(
                    &dir.join("devices"),
                    &lock.name,
                    model,
                )?;
                Ok((!sim.slots().contains_key(&9)).then_some(()))
            }
        },
    )
    .await?;
    let audited: i64 = s
        .server
        .db
        .client()
        .await?
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'local_code.clear' AND resource LIKE '%/localCodes/9'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(audited, 1, "the clearing is audited once");
    agent.stop().await?;
    Ok(())
}

/// A replica given another key than the one the database's PINs are sealed with
/// refuses to start and names the key id it needs.
#[tokio::test]
async fn a_server_with_the_wrong_pin_key_refuses_to_start() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    s.credential(&s.alice.clone(), "4821", panel_scope(&[1]))
        .await?;
    let needed = s.server.store.key().id().to_owned();
    let other = keyplane_store::PinKey::generate()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let config = keyplane_server::Config::new(s.server.db.url.clone(), other);
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        keyplane_server::serve(config, listener, tokio_util_token()),
    )
    .await?;
    let error = result.expect_err("a replica with another key must not start");
    let text = format!("{error:#}");
    assert!(text.contains(&needed), "{text}");
    assert!(
        text.contains("keygen") || text.contains("key file"),
        "{text}"
    );
    Ok(())
}

fn tokio_util_token() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

/// One credential whose sealed PIN no longer opens does not stop the site's sync:
/// the agent receives every other slot.
#[tokio::test]
async fn an_unreadable_row_does_not_stop_a_sites_sync() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let good = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let lock = s.lock.clone();
    let bad = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let bad_id = id_of(&bad.name)?;
    let client = s.server.db.client().await?;
    client
        .execute(
            "UPDATE credential SET pin_sealed = decode('00000000000000000000000000000000000000', 'hex') WHERE id = $1",
            &[&bad_id],
        )
        .await?;
    let snapshot = agent_snapshot(&s.server, &s.site, &s.agent_token).await?;
    assert!(
        snapshot.slots.iter().any(|x| x.credential == good.name),
        "the readable code is delivered"
    );
    assert!(
        !snapshot.slots.iter().any(|x| x.credential == bad.name),
        "the unreadable code is left out, not delivered empty"
    );
    Ok(())
}
