//! Access plans: each user's personal plan and the site's standard plans.

use super::*;

pub(super) async fn personal_get(
    api: &AdminApi,
    request: Request<pb::GetPersonalAccessPlanRequest>,
) -> Res<pb::PersonalAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    let user = parse("name", &req.name, PersonalPlanName::parse)?;
    let plan = api
        .store
        .personal_plan_get(actor.dealer, user.site, user.user)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::plan_pb(&plan)))
}

pub(super) async fn personal_update(
    api: &AdminApi,
    request: Request<pb::UpdatePersonalAccessPlanRequest>,
) -> Res<pb::PersonalAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    let plan = required("plan", req.plan.as_ref())?;
    let user = parse("plan.name", &plan.name, PersonalPlanName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("access_points", !plan.access_points.is_empty()),
            ("schedule", plan.schedule.is_some()),
        ],
    )?;
    let mut patch = store::PlanPatch::default();
    for p in &paths {
        match p.as_str() {
            "access_points" => {
                patch.access_points = Some(site_ids(
                    "plan.access_points",
                    &plan.access_points,
                    user.site,
                    DeviceName::parse,
                    |d| (d.site, d.device),
                    "names a device of another site",
                )?)
            }
            _ => {
                patch.schedule = Some(
                    plan.schedule
                        .as_ref()
                        .map(|s| fields::schedule("plan.schedule", s))
                        .transpose()?,
                )
            }
        }
    }
    let updated = api
        .store
        .personal_plan_update(&actor, user.site, user.user, &patch, &plan.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(user.site);
    Ok(Response::new(res::plan_pb(&updated)))
}

pub(super) async fn personal_clear(
    api: &AdminApi,
    request: Request<pb::ClearPersonalAccessPlanRequest>,
) -> Res<pb::PersonalAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    let user = parse("name", &req.name, PersonalPlanName::parse)?;
    let cleared = api
        .store
        .personal_plan_clear(&actor, user.site, user.user, &req.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(user.site);
    Ok(Response::new(res::plan_pb(&cleared)))
}

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateAccessPlanRequest>,
) -> Res<pb::StandardAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "creating an access plan")?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let plan = required("plan", req.plan.as_ref())?;
    let mut plan_fields = access_plan_fields(
        parent.site,
        plan,
        &["display_name", "devices", "members", "schedule"],
    )?;
    plan_fields.display_name = Some(fields::display_name(
        "plan.display_name",
        &plan.display_name,
    )?);
    let key = api.request_key("CreateAccessPlan", &req.request_id, &req)?;
    let created = api
        .store
        .access_plan_create(&actor, parent.site, &plan_fields, key.as_ref())
        .await
        .map_err(store_status)?;
    api.hub.poke(parent.site);
    Ok(Response::new(res::access_plan_pb(&created)))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetAccessPlanRequest>,
) -> Res<pb::StandardAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    let AccessPlanName { site, plan: id } = parse("name", &req.name, AccessPlanName::parse)?;
    let plan = api
        .store
        .access_plan_get(actor.dealer, site, id)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::access_plan_pb(&plan)))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListAccessPlansRequest>,
) -> Res<pb::ListAccessPlansResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let (plans, next_page_token) = list_page(
        &format!("ListAccessPlans sites/{}", parent.site),
        req.page_size,
        &req.page_token,
        |p: &store::AccessPlan| p.id.to_string(),
        |p| api.store.access_plan_list(actor.dealer, parent.site, p),
    )
    .await?;
    Ok(Response::new(pb::ListAccessPlansResponse {
        plans: plans.iter().map(res::access_plan_pb).collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateAccessPlanRequest>,
) -> Res<pb::StandardAccessPlan> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "changing an access plan")?;
    let plan = required("plan", req.plan.as_ref())?;
    let AccessPlanName { site, plan: id } = parse("plan.name", &plan.name, AccessPlanName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("display_name", !plan.display_name.is_empty()),
            ("devices", !plan.devices.is_empty()),
            ("members", !plan.members.is_empty()),
            ("schedule", plan.schedule.is_some()),
        ],
    )?;
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let fields = access_plan_fields(site, plan, &paths)?;
    let updated = api
        .store
        .access_plan_update(&actor, site, id, &fields, &plan.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(site);
    Ok(Response::new(res::access_plan_pb(&updated)))
}

pub(super) async fn delete(
    api: &AdminApi,
    request: Request<pb::DeleteAccessPlanRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "deleting an access plan")?;
    if PersonalPlanName::looks_like(&req.name) {
        return Err(Status::failed_precondition(
            "a personal access plan cannot be deleted; clear it with ClearPersonalAccessPlan",
        ));
    }
    let AccessPlanName { site, plan: id } = parse("name", &req.name, AccessPlanName::parse)?;
    api.store
        .access_plan_delete(&actor, site, id, &req.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(site);
    Ok(Response::new(()))
}

/// The fields of `paths` from a plan message.
fn access_plan_fields(
    site: Uuid,
    plan: &pb::StandardAccessPlan,
    paths: &[&str],
) -> Result<store::AccessPlanFields, Status> {
    let mut out = store::AccessPlanFields::default();
    for p in paths {
        match *p {
            "display_name" => {
                out.display_name = Some(fields::display_name(
                    "plan.display_name",
                    &plan.display_name,
                )?)
            }
            "devices" => {
                out.devices = Some(site_ids(
                    "plan.devices",
                    &plan.devices,
                    site,
                    DeviceName::parse,
                    |d| (d.site, d.device),
                    "is a device of another site",
                )?)
            }
            "members" => {
                out.members = Some(site_ids(
                    "plan.members",
                    &plan.members,
                    site,
                    UserName::parse,
                    |u| (u.site, u.user),
                    "is a user of another site",
                )?)
            }
            _ => {
                out.schedule = Some(
                    plan.schedule
                        .as_ref()
                        .map(|s| fields::schedule("plan.schedule", s))
                        .transpose()?,
                )
            }
        }
    }
    Ok(out)
}
