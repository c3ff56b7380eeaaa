//! Issue 15: GetSyncStatus of a site whose assignments needing attention do not fit
//! one message (20 full doors: 20,000 assignments on their way, over 4 MiB listed).
//! BASIC answers the roll-ups and issues alone; FULL lists the assignments a page at
//! a time, every one exactly once, each page under the 4 MiB a default client takes.

use crate::fixture::{Site, create_device, create_user, id_of};
use keyplane_proto::v1 as pb;
use prost::Message;
use std::collections::HashSet;

const DOORS: usize = 20;
/// door-1000's slots 1..=1000: every one taken on every door.
const CODES: i64 = 1000;
/// What tonic and grpcurl accept by default.
const DEFAULT_LIMIT: usize = 4 * 1024 * 1024;

/// 20 doors and one code over all of them through the API, then 999 copies of that
/// code (its own id, PIN hash and slot on every door, one change each) inserted in
/// SQL: the API takes minutes to create 1,000 codes on 20 doors on a loaded machine.
async fn fill(s: &mut Site) -> anyhow::Result<()> {
    let site = s.site.clone();
    let mut doors = Vec::new();
    for n in 0..DOORS {
        doors.push(create_device(&mut s.admin, &site, &format!("Door {n}"), "door-1000").await?);
    }
    let user = create_user(&mut s.admin, &site, "Staff").await?;
    let first = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: user,
            credential: Some(pb::Credential {
                display_name: "code 0".into(),
                scope: Some(pb::CredentialScope {
                    doors: doors.iter().map(|d| d.name.clone()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: true,
        })
        .await?
        .into_inner();
    let site_id = id_of(&site)?;
    let template = first
        .name
        .rsplit('/')
        .next()
        .ok_or_else(|| anyhow::anyhow!("credential name {}", first.name))?
        .parse::<uuid::Uuid>()?;
    let mut db = s.server.db.client().await?;
    let tx = db.transaction().await?;
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE copy ON COMMIT DROP AS
           SELECT n, gen_random_uuid() AS id,
                  substring(t.pin_hash FROM 1 FOR length(t.pin_hash) - 32)
                    || sha256(convert_to(n::text || '{template}', 'UTF8')) AS pin_hash
             FROM credential t, generate_series(1, {more}) n
            WHERE t.site_id = '{site_id}' AND t.id = '{template}';
         INSERT INTO credential
           SELECT (jsonb_populate_record(NULL::credential, to_jsonb(t) || jsonb_build_object(
                     'id', c.id, 'display_name', 'code ' || c.n,
                     'pin_hash', '\\x' || encode(c.pin_hash, 'hex')))).*
             FROM credential t, copy c
            WHERE t.site_id = '{site_id}' AND t.id = '{template}';
         INSERT INTO credential_device (site_id, credential_id, device_id)
           SELECT cd.site_id, c.id, cd.device_id FROM credential_device cd, copy c
            WHERE cd.site_id = '{site_id}' AND cd.credential_id = '{template}';
         INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash)
           SELECT sa.site_id, sa.device_id, ((sa.slot - 1 + c.n) % {CODES}) + 1, c.id, c.pin_hash
             FROM slot_assignment sa, copy c
            WHERE sa.site_id = '{site_id}' AND sa.credential_id = '{template}';
         UPDATE site SET revision = revision + 1 WHERE id = '{site_id}';
         INSERT INTO site_change (site_id, revision, device_id, slot)
           SELECT sa.site_id, s.revision, sa.device_id, sa.slot
             FROM slot_assignment sa JOIN copy c ON c.id = sa.credential_id
             JOIN site s ON s.id = sa.site_id;",
        more = CODES - 1,
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

fn request(
    site: &str,
    view: pb::SyncStatusView,
    page_size: i32,
    page_token: &str,
) -> pb::GetSyncStatusRequest {
    pb::GetSyncStatusRequest {
        name: format!("{site}/syncStatus"),
        view: view as i32,
        page_size,
        page_token: page_token.to_owned(),
    }
}

#[tokio::test]
async fn a_big_sites_sync_status_comes_as_a_summary_or_in_pages() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    fill(&mut s).await?;
    let expected = DOORS * CODES as usize;
    // The client takes what tonic and grpcurl take by default.
    let mut admin = s.admin.clone().max_decoding_message_size(DEFAULT_LIMIT);

    let basic = admin
        .get_sync_status(request(&s.site, pb::SyncStatusView::Basic, 0, ""))
        .await?
        .into_inner();
    assert!(
        basic.slots.is_empty() && basic.next_page_token.is_empty(),
        "BASIC lists no assignment"
    );
    assert!(
        basic.devices.iter().all(|d| d.findings.is_none()),
        "nor findings"
    );
    let counts = basic
        .rollup
        .as_ref()
        .and_then(|r| r.counts)
        .unwrap_or_default();
    assert!(counts.total as usize >= expected, "{counts:?}");
    assert_eq!(counts.set, 0, "no agent ever connected: {counts:?}");
    assert_eq!(
        basic.devices.len(),
        DOORS + 2,
        "the fixture's panel and lock, and the doors"
    );
    assert!(
        basic.encoded_len() < 64 * 1024,
        "{} bytes",
        basic.encoded_len()
    );

    // FULL (the default view) a page at a time: the default page, then the largest.
    let mut seen = HashSet::new();
    let mut listed_bytes = 0;
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let size = if pages == 0 { 0 } else { 100_000 };
        let page = admin
            .get_sync_status(request(
                &s.site,
                pb::SyncStatusView::Unspecified,
                size,
                &token,
            ))
            .await?
            .into_inner();
        pages += 1;
        assert!(
            page.encoded_len() < DEFAULT_LIMIT,
            "page {pages}: {} bytes",
            page.encoded_len()
        );
        assert!(
            page.rollup.is_some(),
            "every page carries the site's roll-up"
        );
        if pages == 1 {
            assert_eq!(page.slots.len(), 1000, "the default page");
        } else {
            assert!(page.slots.len() <= 5000, "the largest page");
        }
        for slot in &page.slots {
            listed_bytes += slot.encoded_len();
            assert!(
                seen.insert((slot.device.clone(), slot.slot)),
                "{}:{} listed twice",
                slot.device,
                slot.slot
            );
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(seen.len() >= expected, "{} listed", seen.len());
    assert!(
        listed_bytes > DEFAULT_LIMIT,
        "the whole list ({listed_bytes} bytes) is over what one message may carry"
    );

    // A token is for this call only, and a page size cannot be negative.
    let other = admin
        .list_users(pb::ListUsersRequest {
            parent: s.site.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .next_page_token;
    for bad in [
        request(&s.site, pb::SyncStatusView::Full, 10, &other),
        request(&s.site, pb::SyncStatusView::Full, -1, ""),
    ] {
        let err = admin.get_sync_status(bad).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    Ok(())
}
