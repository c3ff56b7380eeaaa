//! Property test: arbitrary AdminService requests get a clean status (never INTERNAL,
//! UNKNOWN or a dropped connection), and a refused one changes nothing in the database
//! or on the devices (issue 13). 48 cases in CI; `PROPTEST_CASES=5000` by hand.

use crate::bad_input::{Fingerprint, fingerprint_with};
use crate::fixture::Site;
use keyplane_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

/// One request: which method, and the raw values its fields get.
#[derive(Debug, Clone)]
struct Call {
    method: u8,
    a: String,
    b: String,
    n: i32,
    list: Vec<String>,
}

fn text(names: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(names.clone()),
        ".{0,24}",
        "[0-9]{0,12}",
        proptest::sample::select(names)
            .prop_flat_map(|n| ".{0,8}".prop_map(move |t| format!("{n}{t}"))),
        Just("x".repeat(5000)),
    ]
}

fn calls(names: Vec<String>) -> impl Strategy<Value = Call> {
    (
        0u8..10,
        text(names.clone()),
        text(names.clone()),
        prop_oneof![any::<i32>(), -3i32..300],
        proptest::collection::vec(text(names), 0..4),
    )
        .prop_map(|(method, a, b, n, list)| Call {
            method,
            a,
            b,
            n,
            list,
        })
}

async fn run(s: &mut Site, c: &Call) -> Result<(), tonic::Status> {
    let admin = &mut s.admin;
    let scope = pb::CredentialScope {
        locks: c.list.clone(),
        doors: vec![],
        panel_partitions: vec![c.n],
    };
    match c.method {
        0 => admin
            .create_user(pb::CreateUserRequest {
                parent: c.a.clone(),
                user: Some(pb::User {
                    display_name: c.b.clone(),
                    authorities: vec![pb::PartitionAuthority {
                        partition: c.n,
                        level: c.n % 8,
                    }],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        1 => admin
            .create_credential(pb::CreateCredentialRequest {
                parent: c.a.clone(),
                credential: Some(pb::Credential {
                    display_name: "fuzz".into(),
                    pin: c.b.clone(),
                    scope: Some(scope),
                    ..Default::default()
                }),
                request_id: String::new(),
                generate_pin: c.n % 2 == 0,
            })
            .await
            .map(|_| ()),
        2 => admin
            .update_site(pb::UpdateSiteRequest {
                site: Some(pb::Site {
                    name: c.a.clone(),
                    display_name: c.b.clone(),
                    time_zone: c.list.first().cloned().unwrap_or_default(),
                    ..Default::default()
                }),
                update_mask: crate::fixture::mask(&["display_name", "time_zone"]),
            })
            .await
            .map(|_| ()),
        3 => admin
            .create_device(pb::CreateDeviceRequest {
                parent: c.a.clone(),
                device: Some(pb::Device {
                    display_name: c.b.clone(),
                    model: c.list.first().cloned().unwrap_or_default(),
                    partition: c.n,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        4 => admin
            .create_partition(pb::CreatePartitionRequest {
                parent: c.a.clone(),
                partition: Some(pb::Partition {
                    number: c.n,
                    display_name: c.b.clone(),
                    ..Default::default()
                }),
                request_id: c.list.first().cloned().unwrap_or_default(),
            })
            .await
            .map(|_| ()),
        5 => admin
            .update_credential(pb::UpdateCredentialRequest {
                credential: Some(pb::Credential {
                    name: c.a.clone(),
                    pin: c.b.clone(),
                    scope: Some(scope),
                    ..Default::default()
                }),
                update_mask: crate::fixture::mask(&["pin", "scope"]),
            })
            .await
            .map(|_| ()),
        6 => admin
            .delete_user(pb::DeleteUserRequest {
                name: c.a.clone(),
                etag: c.b.clone(),
            })
            .await
            .map(|_| ()),
        7 => admin
            .list_audit_log(pb::ListAuditLogRequest {
                parent: c.a.clone(),
                page_size: c.n,
                page_token: c.b.clone(),
                actor: c.list.first().cloned().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        8 => admin
            .claim_local_code(pb::ClaimLocalCodeRequest {
                name: c.a.clone(),
                user: c.b.clone(),
                panel_partitions: vec![c.n],
            })
            .await
            .map(|_| ()),
        _ => admin
            .put_holiday(pb::PutHolidayRequest {
                holiday: Some(pb::Holiday {
                    name: c.a.clone(),
                    display_name: c.b.clone(),
                    plans: c.list.clone(),
                }),
            })
            .await
            .map(|_| ()),
    }
}

#[test]
fn arbitrary_admin_requests_get_clean_statuses_and_refusals_change_nothing() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let s = rt.block_on(Site::new())?;
    let names = vec![
        s.site.clone(),
        s.alice.clone(),
        s.lock.name.clone(),
        s.panel.name.clone(),
        format!("{}/partitions/1", s.site),
        format!("{}/localCodes/3", s.lock.name),
        format!("{}/holidays/2026-12-25", s.site),
        "sites/-".into(),
        "zwave-lock-30".into(),
        "4821".into(),
        "Europe/Paris".into(),
    ];
    let baseline: std::cell::RefCell<Fingerprint> =
        std::cell::RefCell::new(rt.block_on(fingerprint_with(&s, false))?);
    let s = std::cell::RefCell::new(s);
    let mut runner = TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(48),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&calls(names), |call| {
        let mut s = s.borrow_mut();
        let outcome = rt.block_on(async {
            let r = run(&mut s, &call).await;
            let after = fingerprint_with(&s, false)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((r, after))
        });
        let (r, after) = outcome.map_err(TestCaseError::fail)?;
        match r {
            Ok(()) => *baseline.borrow_mut() = after,
            Err(e) => {
                prop_assert!(
                    !matches!(
                        e.code(),
                        Code::Internal | Code::Unknown | Code::Unimplemented | Code::Unavailable
                    ),
                    "unclean status {:?}: {}",
                    e.code(),
                    e.message()
                );
                prop_assert!(
                    after == *baseline.borrow(),
                    "refused ({:?}: {}) but the database changed",
                    e.code(),
                    e.message()
                );
            }
        }
        Ok(())
    });
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
