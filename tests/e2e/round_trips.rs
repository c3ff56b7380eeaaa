//! Database round trips per mutating RPC, counted on the wire between `keyplaned` and
//! PostgreSQL: each RPC stays under its ceiling, and costs the same round trips,
//! parses and result rows whether a door holds 10 codes or 990 and whether the
//! database holds 1k sites or 50k (seeded with SQL, not through the API).

use crate::fixture::{create_device, create_partition, create_site, create_user_with, id_of, mask};
use keyplane_proto::v1 as pb;
use keyplane_store::Store;
use keyplane_testkit::proxy::{CountingProxy, WireCounts};
use keyplane_testkit::server::{Admin, Ops, TestServer};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Most round trips each RPC may take, authentication included (a dealer token
/// verified within the last second costs none; BEGIN travels with the first
/// statements, COMMIT is one). Every write loads in one pipelined round trip (the site
/// row locked first) and writes in one. A credential's write carries its COMMIT in
/// the same round trip (the write refuses itself in SQL when a slot is missing), so
/// the credential RPCs take 2. A site's create has nothing to load.
const CEILINGS: &[(&str, u64)] = &[
    ("CreateCredential", 2),
    ("UpdateCredential", 2),
    ("DeleteCredential", 2),
    ("CreateUser", 3),
    ("UpdateUser", 3),
    ("DeleteUser", 3),
    ("UpdatePersonalAccessPlan", 3),
    ("CreateAccessPlan", 3),
    ("UpdateAccessPlan", 3),
    ("DeleteAccessPlan", 3),
    ("ClearPersonalAccessPlan", 3),
    ("CreatePartition", 3),
    ("UpdatePartition", 3),
    ("DeletePartition", 3),
    ("CreateDevice", 3),
    ("UpdateDevice", 3),
    ("DeleteDevice", 3),
    ("PutHoliday", 3),
    ("DeleteHoliday", 3),
    ("LockdownDoors", 3),
    ("ReleaseLockdown", 3),
    ("IssueAgentToken", 3),
    ("CreateSite", 2),
    ("UpdateSite", 3),
    ("DeleteSite", 3),
    ("ClaimLocalCode", 3),
    ("RemoveLocalCode", 3),
    ("ResolveDrift (re-apply)", 3),
    ("ResolveDrift (adopt)", 3),
    // A site user acting through the back office costs nothing more: their rows are
    // read by the write's own load.
    ("CreateCredential as a site user", 2),
    ("DeleteCredential as a site user", 2),
    ("CreateEnrollmentCode", 3),
    ("RevokeAgents", 3),
    // Dealer-level: no site row to load.
    ("CreateDealerToken", 2),
    ("RevokeDealerToken", 2),
    // The pool and the site's devices read in one round trip (whatever the devices
    // named), the pool written (3), then read again with the devices by the
    // refill, which finds it full.
    ("ConfigureBackupCodes", 5),
    // The pull (loaded in one round trip, written and read back in one), then the
    // refill: the pool and the devices read in one, and one code generated as
    // CreateCredential would (3).
    ("PullBackupCode", 7),
    // Dealer-level: the dealer row locked and read, then written with its audit row.
    ("UpdateRetentionPolicy", 3),
    // DeleteUser's load and write, then the events and audit records redacted in
    // one round trip, then the erasure's audit row (it holds the counts).
    ("EraseUser", 5),
    // OpsService: the site row updated, then the audit row.
    ("ResyncSite", 3),
    ("CloseAgentConnection", 3),
];

struct Bench {
    server: TestServer,
    token: String,
    proxy: CountingProxy,
    admin: Admin,
    site: String,
    site_id: Uuid,
    panel: pb::Device,
    door: pb::Device,
    alice: String,
    seeded: i32,
    /// OpsService, with the dealer's token.
    ops: Ops,
    /// A site of its own for the backup code pool, so its codes never take a slot
    /// of the door the seeded codes fill.
    pool_site: String,
    pool_lock: String,
    /// Who backup codes are pulled for.
    carol: String,
}

impl Bench {
    async fn new() -> anyhow::Result<Bench> {
        let (server, proxy) = TestServer::start_counted().await?;
        let token = server.dealer("Dealer One").await?;
        let mut admin = server.admin(Some(&token)).await?;
        let site = create_site(&mut admin, "Office", "Europe/Paris").await?;
        create_partition(&mut admin, &site, 1, "Office").await?;
        let panel = create_device(&mut admin, &site, "Panel", "vista-128bpt").await?;
        let door = create_device(&mut admin, &site, "Main door", "door-1000").await?;
        let alice = create_user_with(&mut admin, &site, "Alice", &[(1, pb::Level::Master)]).await?;
        let pool_site = create_site(&mut admin, "Store room", "Europe/Paris").await?;
        create_partition(&mut admin, &pool_site, 1, "Store room").await?;
        let pool_lock = create_device(&mut admin, &pool_site, "Store lock", "zwave-lock-30")
            .await?
            .name;
        let carol = create_user_with(&mut admin, &pool_site, "Carol", &[]).await?;
        let ops = server.ops(Some(&token)).await?;
        Ok(Bench {
            site_id: id_of(&site)?,
            server,
            token,
            proxy,
            admin,
            site,
            panel,
            door,
            alice,
            seeded: 0,
            ops,
            pool_site,
            pool_lock,
            carol,
        })
    }

    /// Puts codes of a seeded user on the door until it holds `codes`, in the lowest
    /// slots, so a new code's free slot lies above all of them.
    async fn seed_codes(&mut self, codes: i32) -> anyhow::Result<()> {
        let db = self.server.db.client().await?;
        let user: Uuid = match db
            .query_opt(
                "SELECT id FROM site_user WHERE site_id = $1 AND display_name = 'Seeded'",
                &[&self.site_id],
            )
            .await?
        {
            Some(row) => row.get(0),
            None => id_of(
                &create_user_with(
                    &mut self.admin,
                    &self.site,
                    "Seeded",
                    &[(1, pb::Level::OperatorA)],
                )
                .await?,
            )?,
        };
        let door = id_of(&self.door.name)?;
        db.execute(
            "WITH c AS (
                INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash)
                SELECT $1, gen_random_uuid(), $2, 'seed ' || i, '\\x00'::bytea, $4, decode(md5('seed' || i), 'hex')
                FROM generate_series($5::int, $6::int) i
                RETURNING id, pin_hash, display_name
             ), d AS (
                INSERT INTO credential_device (site_id, credential_id, device_id) SELECT $1, id, $3 FROM c
             )
             INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash)
             SELECT $1, $3, substr(display_name, 6)::int, id, pin_hash FROM c",
            &[
                &self.site_id,
                &user,
                &door,
                &self.server.store.key().id(),
                &(self.seeded + 1),
                &codes,
            ],
        )
        .await?;
        self.seeded = codes;
        Ok(())
    }

    /// Adds users until `users` of them hold a code on the door (from slot 1 up), a
    /// level in partition 1 and a configured personal plan: what a catch-up must not
    /// read whole.
    async fn seed_users(&mut self, users: i32) -> anyhow::Result<()> {
        let db = self.server.db.client().await?;
        let door = id_of(&self.door.name)?;
        let panel = id_of(&self.panel.name)?;
        db.batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS seed (i int, user_id uuid, credential_id uuid)",
        )
        .await?;
        db.execute(
            "INSERT INTO seed SELECT i, gen_random_uuid(), gen_random_uuid() FROM generate_series($1::int, $2::int) i",
            &[&(self.seeded + 1), &users],
        )
        .await?;
        let key_id = self.server.store.key().id().to_owned();
        for (sql, params) in [
            (
                "INSERT INTO site_user (site_id, id, display_name)
                 SELECT $1, user_id, 'seed ' || i FROM seed WHERE i BETWEEN $2 AND $3",
                vec![],
            ),
            (
                "INSERT INTO user_authority (site_id, user_id, partition, level)
                 SELECT $1, user_id, 1, 3 FROM seed WHERE i BETWEEN $2 AND $3",
                vec![],
            ),
            (
                "INSERT INTO personal_access_plan (site_id, user_id, configured)
                 SELECT $1, user_id, true FROM seed WHERE i BETWEEN $2 AND $3",
                vec![],
            ),
            (
                "INSERT INTO personal_access_point (site_id, user_id, device_id)
                 SELECT $1, user_id, $4 FROM seed WHERE i BETWEEN $2 AND $3",
                vec![panel],
            ),
            (
                "INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash)
                 SELECT $1, credential_id, user_id, 'seed ' || i, '\\x00'::bytea, $4, decode(md5('seed' || i), 'hex')
                 FROM seed WHERE i BETWEEN $2 AND $3",
                vec![],
            ),
            (
                "INSERT INTO credential_partition (site_id, credential_id, partition)
                 SELECT $1, credential_id, 1 FROM seed WHERE i BETWEEN $2 AND $3",
                vec![],
            ),
            (
                "INSERT INTO credential_device (site_id, credential_id, device_id)
                 SELECT $1, credential_id, $4 FROM seed WHERE i BETWEEN $2 AND $3",
                vec![door],
            ),
            (
                "INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash)
                 SELECT $1, $4, i, credential_id, decode(md5('seed' || i), 'hex') FROM seed WHERE i BETWEEN $2 AND $3",
                vec![door],
            ),
        ] {
            let first = self.seeded + 1;
            let mut p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                vec![&self.site_id, &first, &users];
            for d in &params {
                p.push(d);
            }
            if sql.contains("pin_key_id") {
                p.push(&key_id);
            }
            db.execute(sql, &p).await?;
        }
        self.seeded = users;
        Ok(())
    }

    /// Adds sites of other dealers until the database holds `sites`.
    async fn seed_sites(&self, sites: i64) -> anyhow::Result<()> {
        let db = self.server.db.client().await?;
        let have: i64 = db.query_one("SELECT count(*) FROM site", &[]).await?.get(0);
        db.execute(
            "WITH d AS (INSERT INTO dealer (display_name) VALUES ('Seeded dealer') RETURNING id)
             INSERT INTO site (dealer_id, display_name, time_zone, revision)
             SELECT d.id, 'seed ' || i, 'UTC', i FROM d, generate_series(1, $1::int8) i",
            &[&(sites - have)],
        )
        .await?;
        db.batch_execute("ANALYZE").await?;
        Ok(())
    }

    /// Runs every measured RPC once (`round` keeps PINs and names apart) and returns
    /// what each cost on the wire.
    async fn round(&mut self, round: usize) -> anyhow::Result<BTreeMap<&'static str, WireCounts>> {
        let mut out = BTreeMap::new();
        let pins = [("5821", "6932"), ("7043", "8154"), ("9265", "3076")];
        let (pin, pin2) = pins[round % pins.len()];
        let site = self.site.clone();

        let before = self.proxy.counts();
        let bob = self
            .admin
            .create_user(pb::CreateUserRequest {
                parent: site.clone(),
                user: Some(pb::User {
                    display_name: format!("Bob {round}"),
                    authorities: vec![pb::PartitionAuthority {
                        partition: 1,
                        level: pb::Level::OperatorA as i32,
                    }],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .name;
        out.insert("CreateUser", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_user(pb::UpdateUserRequest {
                user: Some(pb::User {
                    name: bob.clone(),
                    display_name: format!("Robert {round}"),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await?;
        out.insert("UpdateUser", self.proxy.counts() - before);

        let before = self.proxy.counts();
        let credential = self
            .admin
            .create_credential(pb::CreateCredentialRequest {
                parent: self.alice.clone(),
                credential: Some(pb::Credential {
                    display_name: "Badge".into(),
                    pin: pin.into(),
                    scope: Some(pb::CredentialScope {
                        panel_partitions: vec![1],
                        locks: vec![],
                        doors: vec![self.door.name.clone()],
                    }),
                    ..Default::default()
                }),
                request_id: format!("round-{round}"),
                generate_pin: false,
            })
            .await?
            .into_inner();
        out.insert("CreateCredential", self.proxy.counts() - before);
        let door_slot = credential
            .slots
            .iter()
            .find(|s| s.device == self.door.name)
            .map(|s| s.slot);
        assert_eq!(
            door_slot,
            Some(self.seeded + 1),
            "the lowest free slot on the door"
        );

        let before = self.proxy.counts();
        self.admin
            .update_credential(pb::UpdateCredentialRequest {
                credential: Some(pb::Credential {
                    name: credential.name.clone(),
                    display_name: "Badge 2".into(),
                    pin: pin2.into(),
                    ..Default::default()
                }),
                update_mask: mask(&["display_name", "pin"]),
            })
            .await?;
        out.insert("UpdateCredential", self.proxy.counts() - before);
        self.local_round(round, &credential.name, &mut out).await?;

        let before = self.proxy.counts();
        self.admin
            .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
                plan: Some(pb::PersonalAccessPlan {
                    name: format!("{}/personalAccessPlan", self.alice),
                    access_points: vec![self.panel.name.clone()],
                    ..Default::default()
                }),
                update_mask: mask(&["access_points"]),
            })
            .await?;
        out.insert("UpdatePersonalAccessPlan", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
                name: format!("{}/personalAccessPlan", self.alice),
                etag: String::new(),
            })
            .await?;
        out.insert("ClearPersonalAccessPlan", self.proxy.counts() - before);

        let before = self.proxy.counts();
        let plan = self
            .admin
            .create_access_plan(pb::CreateAccessPlanRequest {
                parent: site.clone(),
                plan: Some(pb::StandardAccessPlan {
                    display_name: format!("Staff {round}"),
                    devices: vec![self.door.name.clone()],
                    members: vec![self.alice.clone(), bob.clone()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        out.insert("CreateAccessPlan", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_access_plan(pb::UpdateAccessPlanRequest {
                plan: Some(pb::StandardAccessPlan {
                    name: plan.name.clone(),
                    members: vec![self.alice.clone()],
                    ..Default::default()
                }),
                update_mask: mask(&["members"]),
            })
            .await?;
        out.insert("UpdateAccessPlan", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_access_plan(pb::DeleteAccessPlanRequest {
                name: plan.name.clone(),
                etag: String::new(),
            })
            .await?;
        out.insert("DeleteAccessPlan", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_credential(pb::DeleteCredentialRequest {
                name: credential.name.clone(),
                etag: String::new(),
            })
            .await?;
        out.insert("DeleteCredential", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_user(pb::DeleteUserRequest {
                name: bob,
                etag: String::new(),
            })
            .await?;
        out.insert("DeleteUser", self.proxy.counts() - before);
        self.site_config_round(round, &mut out).await?;
        self.dealer_round(round, &mut out).await?;
        Ok(out)
    }

    /// Agents, dealer tokens, backup codes, retention, erasure and the OpsService
    /// remedies.
    async fn dealer_round(
        &mut self,
        round: usize,
        out: &mut BTreeMap<&'static str, WireCounts>,
    ) -> anyhow::Result<()> {
        let site = self.site.clone();
        let before = self.proxy.counts();
        self.admin
            .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
                site: site.clone(),
                ttl_seconds: 0,
            })
            .await?;
        out.insert("CreateEnrollmentCode", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .revoke_agents(pb::RevokeAgentsRequest { site: site.clone() })
            .await?;
        out.insert("RevokeAgents", self.proxy.counts() - before);

        let before = self.proxy.counts();
        let token = self
            .admin
            .create_dealer_token(pb::CreateDealerTokenRequest {
                display_name: format!("Night shift {round}"),
                scope: pb::TokenScope::Ops as i32,
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .dealer_token
            .ok_or_else(|| anyhow::anyhow!("no dealer token in the response"))?;
        out.insert("CreateDealerToken", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .revoke_dealer_token(pb::RevokeDealerTokenRequest { name: token.name })
            .await?;
        out.insert("RevokeDealerToken", self.proxy.counts() - before);

        // The same pool every round: the first creates its user and code, later
        // ones find it full.
        let before = self.proxy.counts();
        self.admin
            .configure_backup_codes(pb::ConfigureBackupCodesRequest {
                site: self.pool_site.clone(),
                devices: vec![self.pool_lock.clone()],
                size: 1,
            })
            .await?;
        out.insert("ConfigureBackupCodes", self.proxy.counts() - before);

        // Pulled and refilled at once (one new code generated).
        let before = self.proxy.counts();
        self.admin
            .pull_backup_code(pb::PullBackupCodeRequest {
                user: self.carol.clone(),
                display_name: format!("Carol's code {round}"),
            })
            .await?;
        out.insert("PullBackupCode", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_retention_policy(pb::UpdateRetentionPolicyRequest {
                retention_policy: Some(pb::RetentionPolicy {
                    name: "retentionPolicy".into(),
                    event_retention: Some(prost_types::Duration {
                        seconds: 86_400 * (400 + round as i64),
                        nanos: 0,
                    }),
                    audit_retention: None,
                }),
                update_mask: mask(&["event_retention"]),
            })
            .await?;
        out.insert("UpdateRetentionPolicy", self.proxy.counts() - before);

        // A person with a panel code and an audited history, erased.
        let eve = create_user_with(
            &mut self.admin,
            &site,
            &format!("Eve {round}"),
            &[(1, pb::Level::OperatorA)],
        )
        .await?;
        self.admin
            .create_credential(pb::CreateCredentialRequest {
                parent: eve.clone(),
                credential: Some(pb::Credential {
                    display_name: "Eve's code".into(),
                    pin: ["4183", "4294", "4305"][round % 3].into(),
                    scope: Some(pb::CredentialScope {
                        panel_partitions: vec![1],
                        locks: vec![],
                        doors: vec![],
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
                generate_pin: false,
            })
            .await?;
        let before = self.proxy.counts();
        self.admin
            .erase_user(pb::EraseUserRequest { name: eve })
            .await?;
        out.insert("EraseUser", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.ops
            .resync_site(pb::ResyncSiteRequest { name: site.clone() })
            .await?;
        out.insert("ResyncSite", self.proxy.counts() - before);

        // An agent's session, as its stream would record it.
        self.server
            .db
            .client()
            .await?
            .execute(
                "UPDATE site SET agent_session = gen_random_uuid(), agent_connected = true,
                    agent_last_seen = now() WHERE id = $1",
                &[&self.site_id],
            )
            .await?;
        let before = self.proxy.counts();
        self.ops
            .close_agent_connection(pb::CloseAgentConnectionRequest {
                name: format!("{site}/agentConnection"),
            })
            .await?;
        out.insert("CloseAgentConnection", self.proxy.counts() - before);
        Ok(())
    }

    /// The local-code and drift calls, on codes the agent reported on the door
    /// (`credential`'s door slot drifted), and a code written by a site user.
    async fn local_round(
        &mut self,
        round: usize,
        credential: &str,
        out: &mut BTreeMap<&'static str, WireCounts>,
    ) -> anyhow::Result<()> {
        use keyplane_core::pin::Pin;
        use keyplane_store::{Observed, ObservedState};
        let slot = self
            .server
            .db
            .client()
            .await?
            .query_one(
                "SELECT slot FROM slot_assignment WHERE site_id = $1 AND credential_id = $2 AND device_id = $3",
                &[&self.site_id, &id_of(credential)?, &id_of(&self.door.name)?],
            )
            .await?
            .get::<_, i32>(0);
        let slot = u16::try_from(slot)?;
        // Above every seeded code, and apart in each round.
        let (claimed, removed) = (1000 - 2 * round as u16, 999 - 2 * round as u16);
        let pins = [
            ("2859", "1736", "4705"),
            ("2960", "1847", "4816"),
            ("3071", "1958", "4927"),
        ];
        let (claim_pin, remove_pin, drift_pin) = pins[round % pins.len()];
        let observe = |slot, state, pin: &str| Observed {
            slot,
            state,
            pin: Pin::parse(pin).ok(),
        };
        let door = id_of(&self.door.name)?;
        let report = |drifted: bool| {
            let mut slots = vec![
                observe(claimed, ObservedState::Foreign, claim_pin),
                observe(removed, ObservedState::Foreign, remove_pin),
            ];
            if drifted {
                slots.push(observe(slot, ObservedState::Drifted, drift_pin));
            }
            slots
        };
        self.server
            .store
            .observed_record(self.site_id, door, &report(true))
            .await?;

        let before = self.proxy.counts();
        let claimed_code = self
            .admin
            .claim_local_code(pb::ClaimLocalCodeRequest {
                name: format!("{}/localCodes/{claimed}", self.door.name),
                user: self.alice.clone(),
                panel_partitions: vec![],
            })
            .await?
            .into_inner();
        out.insert("ClaimLocalCode", self.proxy.counts() - before);
        // Alice's codes are read by later calls of the round: each round starts alike.
        self.admin
            .delete_credential(pb::DeleteCredentialRequest {
                name: claimed_code.name,
                etag: String::new(),
            })
            .await?;

        let before = self.proxy.counts();
        self.admin
            .remove_local_code(pb::RemoveLocalCodeRequest {
                name: format!("{}/localCodes/{removed}", self.door.name),
            })
            .await?;
        out.insert("RemoveLocalCode", self.proxy.counts() - before);

        let resolve = |resolution: pb::resolve_drift_request::Resolution| pb::ResolveDriftRequest {
            credential: credential.to_owned(),
            device: self.door.name.clone(),
            resolution: resolution as i32,
        };
        let before = self.proxy.counts();
        self.admin
            .resolve_drift(resolve(pb::resolve_drift_request::Resolution::Reapply))
            .await?;
        out.insert("ResolveDrift (re-apply)", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .resolve_drift(resolve(pb::resolve_drift_request::Resolution::Adopt))
            .await?;
        out.insert("ResolveDrift (adopt)", self.proxy.counts() - before);

        let mut as_alice = self
            .server
            .admin_as(&self.token, &self.alice, Some(1))
            .await?;
        let before = self.proxy.counts();
        let own = as_alice
            .create_credential(pb::CreateCredentialRequest {
                parent: self.alice.clone(),
                credential: Some(pb::Credential {
                    display_name: "Own badge".into(),
                    pin: ["6203", "6314", "6425"][round % 3].into(),
                    scope: Some(pb::CredentialScope {
                        panel_partitions: vec![],
                        locks: vec![],
                        doors: vec![self.door.name.clone()],
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
                generate_pin: false,
            })
            .await?
            .into_inner();
        out.insert(
            "CreateCredential as a site user",
            self.proxy.counts() - before,
        );
        let before = self.proxy.counts();
        as_alice
            .delete_credential(pb::DeleteCredentialRequest {
                name: own.name,
                etag: String::new(),
            })
            .await?;
        out.insert(
            "DeleteCredential as a site user",
            self.proxy.counts() - before,
        );
        Ok(())
    }

    /// The configuration calls: partitions, devices, holidays, lockdown, agent token,
    /// and a site of its own.
    async fn site_config_round(
        &mut self,
        round: usize,
        out: &mut BTreeMap<&'static str, WireCounts>,
    ) -> anyhow::Result<()> {
        let site = self.site.clone();
        let before = self.proxy.counts();
        let partition = self
            .admin
            .create_partition(pb::CreatePartitionRequest {
                parent: site.clone(),
                partition: Some(pb::Partition {
                    number: 2,
                    display_name: format!("Annex {round}"),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        out.insert("CreatePartition", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_partition(pb::UpdatePartitionRequest {
                partition: Some(pb::Partition {
                    name: partition.name.clone(),
                    display_name: "Annex B".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["display_name"]),
            })
            .await?;
        out.insert("UpdatePartition", self.proxy.counts() - before);

        let before = self.proxy.counts();
        let lock = self
            .admin
            .create_device(pb::CreateDeviceRequest {
                parent: site.clone(),
                device: Some(pb::Device {
                    display_name: format!("Annex lock {round}"),
                    model: "zwave-lock-30".into(),
                    partition: 2,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        out.insert("CreateDevice", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_device(pb::UpdateDeviceRequest {
                device: Some(pb::Device {
                    name: lock.name.clone(),
                    display_name: "Annex back door".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["display_name"]),
            })
            .await?;
        out.insert("UpdateDevice", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_device(pb::DeleteDeviceRequest {
                name: lock.name.clone(),
                etag: String::new(),
            })
            .await?;
        out.insert("DeleteDevice", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_partition(pb::DeletePartitionRequest {
                name: partition.name.clone(),
                etag: String::new(),
            })
            .await?;
        out.insert("DeletePartition", self.proxy.counts() - before);

        let holiday = format!("{site}/holidays/2030-01-0{}", round + 1);
        let before = self.proxy.counts();
        self.admin
            .put_holiday(pb::PutHolidayRequest {
                holiday: Some(pb::Holiday {
                    name: holiday.clone(),
                    display_name: "Closed".into(),
                    plans: vec![],
                }),
            })
            .await?;
        out.insert("PutHoliday", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_holiday(pb::DeleteHolidayRequest { name: holiday })
            .await?;
        out.insert("DeleteHoliday", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() })
            .await?;
        out.insert("LockdownDoors", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() })
            .await?;
        out.insert("ReleaseLockdown", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
            .await?;
        out.insert("IssueAgentToken", self.proxy.counts() - before);

        let before = self.proxy.counts();
        let other = self
            .admin
            .create_site(pb::CreateSiteRequest {
                site: Some(pb::Site {
                    display_name: format!("Kiosk {round}"),
                    time_zone: "Europe/Paris".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        out.insert("CreateSite", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .update_site(pb::UpdateSiteRequest {
                site: Some(pb::Site {
                    name: other.name.clone(),
                    display_name: "Kiosk B".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["display_name"]),
            })
            .await?;
        out.insert("UpdateSite", self.proxy.counts() - before);

        let before = self.proxy.counts();
        self.admin
            .delete_site(pb::DeleteSiteRequest {
                name: other.name,
                etag: String::new(),
            })
            .await?;
        out.insert("DeleteSite", self.proxy.counts() - before);
        Ok(())
    }
}

/// What an agent's catch-up after one new panel code reads.
async fn catch_up_cost(b: &mut Bench, store: &Store, pin: &str) -> anyhow::Result<WireCounts> {
    let db = b.server.db.client().await?;
    let revision: i64 = db
        .query_one("SELECT revision FROM site WHERE id = $1", &[&b.site_id])
        .await?
        .get(0);
    b.admin
        .create_credential(pb::CreateCredentialRequest {
            parent: b.alice.clone(),
            credential: Some(pb::Credential {
                display_name: "Panel".into(),
                pin: pin.into(),
                scope: Some(pb::CredentialScope {
                    panel_partitions: vec![1],
                    locks: vec![],
                    doors: vec![],
                }),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await?;
    let before = b.proxy.counts();
    let update = store.agent_update(b.site_id, revision).await?;
    let cost = b.proxy.counts() - before;
    match update {
        keyplane_store::AgentUpdate::Changes { slots, .. } => assert_eq!(slots.len(), 1),
        _ => anyhow::bail!("expected changes, got a snapshot"),
    }
    Ok(cost)
}

#[tokio::test]
async fn an_agent_catch_up_reads_what_changed_not_the_whole_site() -> anyhow::Result<()> {
    let mut b = Bench::new().await?;
    // A store reaching PostgreSQL through the proxy, to count what agent_update reads.
    let store = Store::connect(&b.proxy.database_url, 1, b.server.store.key().clone())?;
    b.seed_users(10).await?;
    catch_up_cost(&mut b, &store, "5821").await?;
    let small = catch_up_cost(&mut b, &store, "6932").await?;
    b.seed_users(990).await?;
    let large = catch_up_cost(&mut b, &store, "7043").await?;
    eprintln!("catch-up after one change: 10 users {small:?}, 990 users {large:?}");
    // BEGIN with every read pipelined, then COMMIT; each statement from the
    // connection's cache.
    assert!(
        small.round_trips <= 2,
        "a catch-up took {} round trips; its ceiling is 2",
        small.round_trips
    );
    assert_eq!(small.parses, 0, "a catch-up parsed a statement again");
    assert_eq!(
        small, large,
        "a catch-up after one change must read the same with 990 users and codes as with 10"
    );
    // And PostgreSQL reads a few rows for it, not the site: each read under the
    // generic plan a catch-up runs it with, once the 990 codes are in the statistics.
    // A site with a long change log: the generic plans estimate a third of it as
    // changed since any revision, and plan for that many slots.
    let db = b.server.db.client().await?;
    db.execute(
        "INSERT INTO site_change (site_id, revision, device_id, slot)
         SELECT $1, 1, $2, s FROM generate_series(1, 3000) s ON CONFLICT DO NOTHING",
        &[&b.site_id, &id_of(&b.door.name)?],
    )
    .await?;
    db.batch_execute("ANALYZE").await?;
    let head: i64 = db
        .query_one("SELECT revision FROM site WHERE id = $1", &[&b.site_id])
        .await?
        .get(0);
    // The test's tables are small enough for a sequential scan to be the cheaper
    // read of a few rows; a deployment's are not. Without sequential scans, what is
    // left to see is whether the plan must read the site.
    db.batch_execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        .await?;
    for (i, sql) in keyplane_store::CATCH_UP_READS.iter().enumerate() {
        db.batch_execute(&format!("PREPARE catch_up_{i} AS {sql}"))
            .await?;
        let args = if sql.contains("$2") {
            format!("'{}'::uuid, {}", b.site_id, head - 1)
        } else {
            format!("'{}'::uuid", b.site_id)
        };
        let plan: serde_json::Value = db
            .query_one(
                &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE catch_up_{i}({args})"),
                &[],
            )
            .await?
            .get(0);
        let read = rows_read(&plan[0]["Plan"]);
        assert!(
            read <= 20.0,
            "a catch-up read {read} rows for one change with 990 codes on the site: {sql}\n{plan:#}"
        );
    }
    Ok(())
}

/// Rows the scans of a plan node and its children read (returned, or read and
/// filtered out), over every loop.
fn rows_read(node: &serde_json::Value) -> f64 {
    let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
    let own = if node["Node Type"]
        .as_str()
        .is_some_and(|t| t.contains("Scan"))
    {
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let children: f64 = node["Plans"]
        .as_array()
        .map(|plans| plans.iter().map(rows_read).sum())
        .unwrap_or(0.0);
    own + children
}

fn table(label: &str, counts: &BTreeMap<&'static str, WireCounts>) {
    eprintln!("{label}:");
    for (rpc, c) in counts {
        eprintln!(
            "  {rpc:<26} round trips {:>3}  parses {:>3}  rows {:>5}",
            c.round_trips, c.parses, c.rows
        );
    }
}

#[tokio::test]
async fn round_trips_per_rpc_stay_under_their_ceilings_and_flat_as_sites_and_codes_grow()
-> anyhow::Result<()> {
    let mut b = Bench::new().await?;
    b.seed_codes(10).await?;
    b.seed_sites(1_000).await?;
    // The first round fills the connection's statement cache.
    let first = b.round(0).await?;
    table("first use (statements prepared)", &first);
    let small = b.round(1).await?;
    table("10 codes on the door, 1k sites", &small);

    b.seed_codes(990).await?;
    b.seed_sites(50_000).await?;
    let large = b.round(2).await?;
    table("990 codes on the door, 50k sites", &large);

    for (rpc, ceiling) in CEILINGS {
        let c = small[rpc];
        assert!(
            c.round_trips <= *ceiling,
            "{rpc} took {} round trips; its ceiling is {ceiling}",
            c.round_trips
        );
        assert_eq!(
            small[rpc], large[rpc],
            "{rpc} must cost the same with 990 codes and 50k sites as with 10 codes and 1k sites"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_removed_dealer_token_stops_working_within_a_second() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.dealer("Dealer One").await?;
    let mut admin = server.admin(Some(&token)).await?;
    // Verified once: now in the server's token cache.
    admin.list_sites(pb::ListSitesRequest::default()).await?;
    server
        .db
        .client()
        .await?
        .execute("DELETE FROM dealer_token", &[])
        .await?;
    let removed = std::time::Instant::now();
    loop {
        match admin.list_sites(pb::ListSitesRequest::default()).await {
            Err(e) if e.code() == tonic::Code::Unauthenticated => break,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        assert!(
            removed.elapsed()
                < keyplane_store::DEALER_TOKEN_TTL + std::time::Duration::from_millis(500),
            "a removed dealer token still works after {:?}",
            removed.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_wake_up_poller_reads_the_same_whatever_the_number_of_sites_held() -> anyhow::Result<()>
{
    let b = Bench::new().await?;
    b.seed_sites(1_000).await?;
    let db = b.server.db.client().await?;
    // Nothing changed lately: a poll has no site to report.
    db.execute(
        "UPDATE site SET change_time = now() - interval '1 hour'",
        &[],
    )
    .await?;
    let store = Store::connect(&b.proxy.database_url, 1, b.server.store.key().clone())?;
    let ids: Vec<Uuid> = b
        .server
        .db
        .client()
        .await?
        .query("SELECT id FROM site", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut per_poll = Vec::new();
    for held in [1, ids.len()] {
        let hub = keyplane_server::hub::Hub::default();
        // Streams of `held` sites, as if that many agents were connected here.
        let receivers: Vec<_> = ids[..held].iter().map(|id| hub.subscribe(*id)).collect();
        let cancel = tokio_util::sync::CancellationToken::new();
        let start = b.proxy.counts();
        let poller = tokio::spawn(hub.poll(
            store.clone(),
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(20),
            // The held-site check (one query per period) is kept out of this count.
            std::time::Duration::from_secs(3600),
            // The seen refresh (one statement per period whatever the sites held) is
            // kept out of this count.
            std::time::Duration::from_secs(3600),
            cancel.clone(),
        ));
        // Progress, not time: wait for five polls to cross the wire.
        keyplane_testkit::server::eventually(
            "five polls",
            std::time::Duration::from_secs(20),
            || {
                let polled = (b.proxy.counts() - start).round_trips;
                async move { Ok((polled >= 5).then_some(())) }
            },
        )
        .await?;
        cancel.cancel();
        poller.await?;
        let cost = b.proxy.counts() - start;
        per_poll.push((cost.rows as f64 / cost.round_trips as f64, held));
        drop(receivers);
    }
    eprintln!("rows per poll (rows, sites held): {per_poll:?}");
    for (rows, held) in per_poll {
        // One row: the database clock, which the next poll starts from.
        assert!(
            rows <= 1.0,
            "a poll holding {held} sites read {rows} rows; it must read the sites that changed, not the sites held"
        );
    }
    Ok(())
}
