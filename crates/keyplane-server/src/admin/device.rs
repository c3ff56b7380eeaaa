//! Devices of a site: panels, locks, doors.

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateDeviceRequest>,
) -> Res<pb::Device> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "adding a device")?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let device = required("device", req.device.as_ref())?;
    let new = store::NewDevice {
        display_name: fields::display_name("device.display_name", &device.display_name)?,
        model: fields::device_model(device.kind, &device.model)?,
        partition: fields::partition_opt("device.partition", device.partition)?,
        perimeter: device.perimeter,
    };
    let key = api.request_key("CreateDevice", &req.request_id, &req)?;
    let created = api
        .store
        .device_create(&actor, parent.site, &new, key.as_ref())
        .await
        .map_err(store_status)?;
    api.hub.poke(parent.site);
    Ok(Response::new(res::device_pb(&created)))
}

pub(super) async fn get(api: &AdminApi, request: Request<pb::GetDeviceRequest>) -> Res<pb::Device> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, DeviceName::parse)?;
    let (d, occupancy) = tokio::try_join!(
        api.store.device_get(actor.dealer, name.site, name.device),
        api.store.device_occupancy(name.site),
    )
    .map_err(store_status)?;
    Ok(Response::new(res::device_capacity_pb(
        &d,
        occupancy.get(&d.id),
    )))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListDevicesRequest>,
) -> Res<pb::ListDevicesResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let (items, next_page_token) = list_page(
        &format!("ListDevices sites/{}", parent.site),
        req.page_size,
        &req.page_token,
        |d: &store::Device| d.id.to_string(),
        |p| api.store.device_list(actor.dealer, parent.site, p),
    )
    .await?;
    // Read after the page, which checked the site is the dealer's.
    let occupancy = api
        .store
        .device_occupancy(parent.site)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListDevicesResponse {
        devices: items
            .iter()
            .map(|d| res::device_capacity_pb(d, occupancy.get(&d.id)))
            .collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateDeviceRequest>,
) -> Res<pb::Device> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "changing a device")?;
    let device = required("device", req.device.as_ref())?;
    let name = parse("device.name", &device.name, DeviceName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("display_name", !device.display_name.is_empty()),
            ("partition", device.partition != 0),
            ("perimeter", device.perimeter),
        ],
    )?;
    let mut patch = store::DevicePatch::default();
    for p in &paths {
        match p.as_str() {
            "display_name" => {
                patch.display_name = Some(fields::display_name(
                    "device.display_name",
                    &device.display_name,
                )?)
            }
            "partition" => {
                patch.partition = Some(fields::partition_opt("device.partition", device.partition)?)
            }
            _ => patch.perimeter = Some(device.perimeter),
        }
    }
    let updated = api
        .store
        .device_update(&actor, name.site, name.device, &patch, &device.etag)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::device_pb(&updated)))
}

pub(super) async fn delete(api: &AdminApi, request: Request<pb::DeleteDeviceRequest>) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "deleting a device")?;
    let name = parse("name", &req.name, DeviceName::parse)?;
    api.store
        .device_delete(&actor, name.site, name.device, &req.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(()))
}
