//! Partitions of a site (1..8).

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreatePartitionRequest>,
) -> Res<pb::Partition> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "adding a partition")?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let partition = required("partition", req.partition.as_ref())?;
    let number = fields::partition("partition.number", partition.number)?;
    let display_name = if partition.display_name.is_empty() {
        format!("Partition {number}")
    } else {
        fields::display_name("partition.display_name", &partition.display_name)?
    };
    let key = api.request_key("CreatePartition", &req.request_id, &req)?;
    let created = api
        .store
        .partition_create(&actor, parent.site, number, &display_name, key.as_ref())
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::partition_pb(&created)))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetPartitionRequest>,
) -> Res<pb::Partition> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, PartitionName::parse)?;
    let p = api
        .store
        .partition_get(actor.dealer, name.site, name.number)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::partition_pb(&p)))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListPartitionsRequest>,
) -> Res<pb::ListPartitionsResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let list = format!("ListPartitions sites/{}", parent.site);
    let (after, limit) = page_partitions(&list, req.page_size, &req.page_token)?;
    let items = api
        .store
        .partition_list(actor.dealer, parent.site, after, limit + 1)
        .await
        .map_err(store_status)?;
    let (items, next_page_token) = page_split(&list, items, limit, |p| p.number.to_string());
    Ok(Response::new(pb::ListPartitionsResponse {
        partitions: items.iter().map(res::partition_pb).collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdatePartitionRequest>,
) -> Res<pb::Partition> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "renaming a partition")?;
    let partition = required("partition", req.partition.as_ref())?;
    let name = parse("partition.name", &partition.name, PartitionName::parse)?;
    mask_paths(
        req.update_mask.as_ref(),
        &[("display_name", !partition.display_name.is_empty())],
    )?;
    let display_name = fields::display_name("partition.display_name", &partition.display_name)?;
    let updated = api
        .store
        .partition_update(
            &actor,
            name.site,
            name.number,
            Some(&display_name),
            &partition.etag,
        )
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::partition_pb(&updated)))
}

pub(super) async fn delete(
    api: &AdminApi,
    request: Request<pb::DeletePartitionRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    installer_only(&actor, "deleting a partition")?;
    let name = parse("name", &req.name, PartitionName::parse)?;
    api.store
        .partition_delete(&actor, name.site, name.number, &req.etag)
        .await
        .map_err(store_status)?;
    Ok(Response::new(()))
}
