//! Backup codes (issue 11): a pool of codes set in advance on chosen locks and doors,
//! held by the site's pool user, pulled for a person while the site may be offline.

use super::*;

/// Most codes a pool keeps ready.
const MAX_POOL: i32 = 20;

fn pool_pb(site: Uuid, pool: &store::BackupPool, available: i64) -> pb::BackupCodePool {
    pb::BackupCodePool {
        site: SiteName { site }.to_string(),
        devices: pool
            .devices
            .iter()
            .map(|d| DeviceName { site, device: *d }.to_string())
            .collect(),
        size: pool.size,
        available: i32::try_from(available).unwrap_or(i32::MAX),
        pool_user: UserName {
            site,
            user: pool.user,
        }
        .to_string(),
    }
}

/// What configuring or refilling a pool reads (one round trip): the site's pool with
/// how many codes it holds, and the site's devices.
type PoolFacts = (Option<(store::BackupPool, i64)>, Vec<store::Device>);

/// Reads [`PoolFacts`] of `site`.
async fn pool_facts(api: &AdminApi, actor: &store::Actor, site: Uuid) -> Result<PoolFacts, Status> {
    api.store
        .backup_pool_facts(actor.dealer, site)
        .await
        .map_err(store_status)
}

/// Creates codes until the pool holds its size; returns how many it holds. A code
/// that cannot be created (a device full) stops the refill, logged; the pool shows
/// as low in GetSyncStatus until it refills.
async fn refill(api: &AdminApi, actor: &store::Actor, site: Uuid) -> Result<i64, Status> {
    let (Some((pool, mut available)), devices) = pool_facts(api, actor, site).await? else {
        return Ok(0);
    };
    let mut scope = store::Scope::default();
    for d in devices.iter().filter(|d| pool.devices.contains(&d.id)) {
        match d.kind() {
            keyplane_core::DeviceKind::Lock => scope.locks.push(d.id),
            keyplane_core::DeviceKind::Door => scope.doors.push(d.id),
            keyplane_core::DeviceKind::Panel => {}
        }
    }
    if scope.is_empty() {
        return Ok(available);
    }
    let template = pb::Credential {
        display_name: "Backup code".into(),
        ..Default::default()
    };
    while available < i64::from(pool.size) {
        let parent = UserName {
            site,
            user: pool.user,
        };
        let code = credential::GeneratedCode {
            parent,
            credential: &template,
            scope: &scope,
            system_owner: true,
        };
        // The devices just read: each code created costs its write only.
        match credential::generated_credential(api, actor, code, None, Some(&devices)).await {
            Ok(_) => available += 1,
            Err(status) => {
                tracing::warn!(%site, %status, "backup code pool not refilled");
                break;
            }
        }
    }
    api.hub.poke(site);
    Ok(available)
}

pub(super) async fn configure(
    api: &AdminApi,
    request: Request<pb::ConfigureBackupCodesRequest>,
) -> Res<pb::BackupCodePool> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "configuring backup codes")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    if !(0..=MAX_POOL).contains(&req.size) {
        return Err(Status::invalid_argument(format!(
            "size must be 0..{MAX_POOL}"
        )));
    }
    let mut devices = Vec::new();
    // Read once, when the first device is looked up (errors come in the order of
    // the devices named).
    let mut facts: Option<PoolFacts> = None;
    for (i, name) in req.devices.iter().enumerate() {
        let d = parse(&format!("devices[{i}]"), name, DeviceName::parse)?;
        if d.site != site.site {
            return Err(Status::invalid_argument(format!(
                "devices[{i}] {name} is not a device of {}",
                req.site
            )));
        }
        let (_, all) = match &mut facts {
            Some(f) => f,
            None => facts.insert(pool_facts(api, &actor, site.site).await?),
        };
        let Some(kind) = all.iter().find(|x| x.id == d.device).map(|x| x.kind()) else {
            return Err(store_status(store::StoreError::NotFound(format!(
                "device sites/{}/devices/{}",
                site.site, d.device
            ))));
        };
        if kind == keyplane_core::DeviceKind::Panel {
            // An unowned live panel code would be a user number nobody answers for.
            return Err(Status::invalid_argument(format!(
                "devices[{i}] {name} is a panel: backup codes are for locks and doors only"
            )));
        }
        devices.push(d.device);
    }
    if req.size > 0 && devices.is_empty() {
        return Err(Status::invalid_argument(
            "devices must name at least one lock or door",
        ));
    }
    let (existing, _) = match facts {
        Some(f) => f,
        None => pool_facts(api, &actor, site.site).await?,
    };
    let user = match existing {
        Some((pool, _)) => pool.user,
        None => {
            api.store
                .user_create(
                    &actor,
                    site.site,
                    &store::NewUser {
                        display_name: "Backup codes (unassigned)".into(),
                        authorities: Default::default(),
                        open_close_reporting: false,
                        // Not a person: hidden from ListUsers and GetUser, so a back
                        // office never takes it for one, and never changed or deleted
                        // through the user API.
                        system: true,
                    },
                    None,
                )
                .await
                .map_err(store_status)?
                .id
        }
    };
    let pool = store::BackupPool {
        user,
        devices,
        size: req.size,
    };
    api.store
        .backup_pool_set(&actor, site.site, &pool)
        .await
        .map_err(store_status)?;
    let available = refill(api, &actor, site.site).await?;
    Ok(Response::new(pool_pb(site.site, &pool, available)))
}

pub(super) async fn pull(
    api: &AdminApi,
    request: Request<pb::PullBackupCodeRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let user = parse("user", &req.user, UserName::parse)?;
    let display_name = if req.display_name.is_empty() {
        "Backup code".to_owned()
    } else {
        fields::display_name("display_name", &req.display_name)?
    };
    let (credential, pin) = api
        .store
        .backup_pull(&actor, user.site, user.user, &display_name)
        .await
        .map_err(store_status)?;
    api.hub.poke(user.site);
    tracing::info!(site = %user.site, user = %req.user, "backup code pulled");
    let mut out = res::credential_pb(&credential);
    // The one time this code is shown.
    out.pin = pin.expose().to_owned();
    // Refill at once; a failure leaves the pool low (GetSyncStatus says so).
    if let Err(status) = refill(api, &actor, user.site).await {
        tracing::warn!(site = %user.site, %status, "backup code pool not refilled");
    }
    Ok(Response::new(out))
}
