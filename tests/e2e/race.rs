//! Concurrent creates racing for the last free slot: exactly one wins.

use crate::fixture::{Site, create_user, lock_scope};
use tonic::Code;

#[tokio::test]
async fn exactly_one_create_wins_the_last_slot() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let site = s.site.clone();
    let user = create_user(&mut s.admin, &site, "Tenants").await?;
    for i in 0..29 {
        s.credential(&user, &format!("{:04}", 2000 + i * 3), lock_scope(&[&lock]))
            .await?;
    }
    let racers = 8;
    let mut tasks = Vec::new();
    for i in 0..racers {
        let mut admin = s.admin.clone();
        let user = user.clone();
        let scope = lock_scope(&[&lock]);
        tasks.push(tokio::spawn(async move {
            admin
                .create_credential(keyplane_proto::v1::CreateCredentialRequest {
                    parent: user,
                    credential: Some(keyplane_proto::v1::Credential {
                        pin: format!("{:04}", 7000 + i),
                        scope: Some(scope),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                    generate_pin: false,
                })
                .await
        }));
    }
    let mut won = Vec::new();
    let mut lost = 0;
    for t in tasks {
        match t.await? {
            Ok(c) => won.push(c.into_inner()),
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                lost += 1;
            }
        }
    }
    assert_eq!(won.len(), 1, "exactly one create wins");
    assert_eq!(lost, racers - 1);
    let client = s.server.db.client().await?;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT slot), max(slot) FROM slot_assignment WHERE device_id::text = $1",
            &[&lock.name.rsplit('/').next().unwrap_or_default()],
        )
        .await?;
    let (count, distinct, max): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((count, distinct, max), (30, 30, 30));
    Ok(())
}
