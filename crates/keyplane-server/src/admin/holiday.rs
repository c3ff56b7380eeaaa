//! Site holidays pausing access plans.

use super::*;

pub(super) async fn put(
    api: &AdminApi,
    request: Request<pb::PutHolidayRequest>,
) -> Res<pb::Holiday> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "setting a holiday")?;
    let holiday = required("holiday", req.holiday.as_ref())?;
    let HolidayName { site, day } = parse("holiday.name", &holiday.name, HolidayName::parse)?;
    let mut plans = Vec::new();
    for (i, p) in holiday.plans.iter().enumerate() {
        let AccessPlanName {
            site: plan_site,
            plan: id,
        } = parse(&format!("holiday.plans[{i}]"), p, AccessPlanName::parse)?;
        if plan_site != site {
            return Err(Status::invalid_argument(format!(
                "holiday.plans[{i}] is a plan of another site"
            )));
        }
        plans.push(id);
    }
    let put = api
        .store
        .holiday_put(
            &actor,
            &store::Holiday {
                site,
                day,
                display_name: if holiday.display_name.is_empty() {
                    "Holiday".into()
                } else {
                    fields::display_name("holiday.display_name", &holiday.display_name)?
                },
                plans,
            },
        )
        .await
        .map_err(store_status)?;
    api.hub.poke(site);
    Ok(Response::new(res::holiday_pb(&put)))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListHolidaysRequest>,
) -> Res<pb::ListHolidaysResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let holidays = api
        .store
        .holiday_list(actor.dealer, parent.site)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListHolidaysResponse {
        holidays: holidays.iter().map(res::holiday_pb).collect(),
    }))
}

pub(super) async fn delete(api: &AdminApi, request: Request<pb::DeleteHolidayRequest>) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "deleting a holiday")?;
    let HolidayName { site, day } = parse("name", &req.name, HolidayName::parse)?;
    api.store
        .holiday_delete(&actor, site, day)
        .await
        .map_err(store_status)?;
    api.hub.poke(site);
    Ok(Response::new(()))
}
