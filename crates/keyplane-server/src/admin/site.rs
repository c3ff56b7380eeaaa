//! Sites: create, read, change, delete; lockdown; sync status; agent tokens.

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateSiteRequest>,
) -> Res<pb::Site> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "creating a site")?;
    let site = required("site", req.site.as_ref())?;
    let new = store::NewSite {
        display_name: fields::display_name("site.display_name", &site.display_name)?,
        time_zone: fields::time_zone(&site.time_zone)?,
        local_code_policy: fields::policy(site.local_code_policy)?,
    };
    let key = api.request_key("CreateSite", &req.request_id, site)?;
    let created = api
        .store
        .site_create(&actor, &new, key.as_ref())
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::site_pb(&created)))
}

pub(super) async fn get(api: &AdminApi, request: Request<pb::GetSiteRequest>) -> Res<pb::Site> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, SiteName::parse)?;
    let site = api
        .store
        .site_get(actor.dealer, name.site)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::site_pb(&site)))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListSitesRequest>,
) -> Res<pb::ListSitesResponse> {
    let (actor, req) = dealer_call(request)?;
    let (sites, next_page_token) = list_page(
        "ListSites",
        req.page_size,
        &req.page_token,
        |s: &store::Site| s.id.to_string(),
        |p| api.store.site_list(actor.dealer, p),
    )
    .await?;
    Ok(Response::new(pb::ListSitesResponse {
        sites: sites.iter().map(res::site_pb).collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateSiteRequest>,
) -> Res<pb::Site> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "changing a site")?;
    let site = required("site", req.site.as_ref())?;
    let name = parse("site.name", &site.name, SiteName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("display_name", !site.display_name.is_empty()),
            ("time_zone", !site.time_zone.is_empty()),
            ("local_code_policy", site.local_code_policy != 0),
            ("status_thresholds", site.status_thresholds.is_some()),
        ],
    )?;
    if paths.iter().any(|p| p == "status_thresholds") {
        if paths.len() > 1 {
            return Err(Status::invalid_argument(
                "update_mask: change status_thresholds on its own",
            ));
        }
        let thresholds = fields::status_thresholds(site.status_thresholds.as_ref())?;
        let updated = api
            .store
            .site_thresholds_set(&actor, name.site, &thresholds)
            .await
            .map_err(store_status)?;
        return Ok(Response::new(res::site_pb(&updated)));
    }
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
    let updated = api
        .store
        .site_update(&actor, name.site, &patch, &site.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(res::site_pb(&updated)))
}

pub(super) async fn delete(api: &AdminApi, request: Request<pb::DeleteSiteRequest>) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "deleting a site")?;
    let name = parse("name", &req.name, SiteName::parse)?;
    api.store
        .site_delete(&actor, name.site, &req.etag)
        .await
        .map_err(store_status)?;
    // Its agent stream here ends now; other replicas' pollers see the deletion.
    api.hub.gone(name.site);
    Ok(Response::new(()))
}

pub(super) async fn lockdown(
    api: &AdminApi,
    request: Request<pb::LockdownDoorsRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "locking down doors")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    api.store
        .site_lockdown_set(&actor, site.site, true)
        .await
        .map_err(store_status)?;
    api.hub.poke(site.site);
    api.bell.ring();
    Ok(Response::new(()))
}

pub(super) async fn lockdown_release(
    api: &AdminApi,
    request: Request<pb::ReleaseLockdownRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "releasing a lockdown")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    api.store
        .site_lockdown_set(&actor, site.site, false)
        .await
        .map_err(store_status)?;
    api.hub.poke(site.site);
    api.bell.ring();
    Ok(Response::new(()))
}

/// Assignments GetSyncStatus lists per page when the request names no page size:
/// about 300 KiB (an assignment with its pending change is about 300 bytes).
const SYNC_STATUS_PAGE_SIZE: i64 = 1000;
/// The most it lists per page: about 1.5 MiB, under the 4 MiB a client takes by default.
const SYNC_STATUS_MAX_PAGE_SIZE: i64 = 5000;

pub(super) async fn sync_status(
    api: &AdminApi,
    request: Request<pb::GetSyncStatusRequest>,
) -> Res<pb::SyncStatus> {
    let (actor, req) = dealer_call(request)?;
    let site = parse("name", &req.name, SyncStatusName::parse)?;
    // The request is checked before the site is read: on a big site that read takes
    // seconds, and a bad view, token or page size must be refused at once.
    let view = pb::SyncStatusView::try_from(req.view)
        .map_err(|_| Status::invalid_argument(format!("view: unknown value {}", req.view)))?;
    let list = format!("GetSyncStatus {site}");
    let page = if view == pb::SyncStatusView::Basic {
        None
    } else {
        let (after, limit) = crate::page::page_keyed(
            &list,
            req.page_size,
            &req.page_token,
            SYNC_STATUS_PAGE_SIZE,
            SYNC_STATUS_MAX_PAGE_SIZE,
        )?;
        let after = match after {
            None => None,
            Some(key) => Some(
                key.rsplit_once(' ')
                    .and_then(|(d, s)| Some((d.to_owned(), s.parse::<i32>().ok()?)))
                    .ok_or_else(crate::page::malformed_token)?,
            ),
        };
        Some((after, limit))
    };
    let (status, facts) = tokio::try_join!(
        api.store.sync_status(actor.dealer, site.site),
        api.store.slot_status_facts(actor.dealer, site.site, None),
    )
    .map_err(store_status)?;
    let states = res::slot_states(&facts);
    let mut out = res::sync_pb(&status, &facts, &states);
    match page {
        None => {
            out.slots = Vec::new();
            for d in &mut out.devices {
                d.findings = None;
            }
        }
        Some((after, limit)) => {
            // `slots` is sorted by (device, slot), the key of the token.
            let start = match after {
                None => 0,
                Some((device, slot)) => out
                    .slots
                    .partition_point(|s| (s.device.as_str(), s.slot) <= (device.as_str(), slot)),
            };
            let slots = std::mem::take(&mut out.slots);
            let (page, next) = crate::page::page_split(
                &list,
                slots.into_iter().skip(start).collect(),
                limit,
                |s: &pb::SlotAssignmentStatus| format!("{} {}", s.device, s.slot),
            );
            out.slots = page;
            out.next_page_token = next;
        }
    }
    // Issue 14: the agent's last Hello, and a clock skew it showed.
    if let Some(hello) = api
        .store
        .agent_hello_get(actor.dealer, site.site)
        .await
        .map_err(store_status)?
    {
        let (agent, issues) = res::agent_hello_pb(&hello);
        out.agent = Some(agent);
        out.site_issues = issues;
    }
    // Backup codes (issue 11): a pool short of its size says so.
    if let Some((pool, available)) = api
        .store
        .backup_pool_get(actor.dealer, site.site)
        .await
        .map_err(store_status)?
        && available < i64::from(pool.size)
    {
        out.setup_issues.push(format!(
            "backup codes running low: {available} of {} ready; the pool refills when a code can be created on its devices",
            pool.size
        ));
    }
    Ok(Response::new(out))
}

pub(super) async fn agent_token_issue(
    api: &AdminApi,
    request: Request<pb::IssueAgentTokenRequest>,
) -> Res<pb::IssueAgentTokenResponse> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "issuing an agent token")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    let token = api
        .store
        .agent_token_issue(&actor, site.site)
        .await
        .map_err(store_status)?;
    // The old token's stream re-checks and ends, on whichever replica holds it.
    api.hub.changed(site.site);
    Ok(Response::new(pb::IssueAgentTokenResponse { token }))
}

/// How long an enrollment code works when the request does not say.
const ENROLLMENT_CODE_DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

pub(super) async fn enrollment_code_create(
    api: &AdminApi,
    request: Request<pb::CreateEnrollmentCodeRequest>,
) -> Res<pb::EnrollmentCode> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "creating an enrollment code")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    let ttl = match req.ttl_seconds {
        0 => ENROLLMENT_CODE_DEFAULT_TTL,
        n => std::time::Duration::from_secs(
            u64::try_from(n)
                .map_err(|_| Status::invalid_argument("ttl_seconds must not be negative"))?,
        ),
    };
    let code = api
        .store
        .enrollment_code_create(&actor, site.site, ttl)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::EnrollmentCode {
        code: code.code,
        site: site.to_string(),
        expire_time: Some(prost_types::Timestamp::from(code.expire_time)),
    }))
}

pub(super) async fn agents_revoke(
    api: &AdminApi,
    request: Request<pb::RevokeAgentsRequest>,
) -> Res<pb::RevokeAgentsResponse> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "revoking agents")?;
    let site = parse("site", &req.site, SiteName::parse)?;
    let n = api
        .store
        .agent_revoke(&actor, site.site)
        .await
        .map_err(store_status)?;
    api.hub.changed(site.site);
    Ok(Response::new(pb::RevokeAgentsResponse {
        revoked: i32::try_from(n).unwrap_or(i32::MAX),
    }))
}
