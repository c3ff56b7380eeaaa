//! Local codes (set at a device) and drift resolution.

use super::*;

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListLocalCodesRequest>,
) -> Res<pb::ListLocalCodesResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let codes = api
        .store
        .local_code_list(actor.dealer, parent.site)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListLocalCodesResponse {
        local_codes: codes.iter().map(res::local_code_pb).collect(),
    }))
}

pub(super) async fn claim(
    api: &AdminApi,
    request: Request<pb::ClaimLocalCodeRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let LocalCodeName { device, slot } = parse("name", &req.name, LocalCodeName::parse)?;
    let user = parse("user", &req.user, UserName::parse)?;
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
    let credential = api
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
    api.hub.poke(device.site);
    Ok(Response::new(res::credential_pb(&credential)))
}

pub(super) async fn remove(
    api: &AdminApi,
    request: Request<pb::RemoveLocalCodeRequest>,
) -> Res<pb::LocalCode> {
    let (actor, req) = dealer_call(request)?;
    let LocalCodeName { device, slot } = parse("name", &req.name, LocalCodeName::parse)?;
    let local = api
        .store
        .local_code_remove(&actor, device.site, device.device, slot)
        .await
        .map_err(store_status)?;
    api.hub.poke(device.site);
    Ok(Response::new(res::local_code_pb(&local)))
}

pub(super) async fn drift_resolve(
    api: &AdminApi,
    request: Request<pb::ResolveDriftRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let credential = parse("credential", &req.credential, CredentialName::parse)?;
    let device = parse("device", &req.device, DeviceName::parse)?;
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
    let updated = api
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
    api.hub.poke(credential.site);
    Ok(Response::new(res::credential_pb(&updated)))
}
