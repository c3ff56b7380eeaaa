//! Users of a site and their levels.

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateUserRequest>,
) -> Res<pb::User> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let user = required("user", req.user.as_ref())?;
    let new = store::NewUser {
        display_name: fields::display_name("user.display_name", &user.display_name)?,
        authorities: fields::authorities("user.authorities", &user.authorities)?,
        open_close_reporting: user.open_close_reporting,
        system: false,
    };
    let key = api.request_key("CreateUser", &req.request_id, &req)?;
    let created = api
        .store
        .user_create(&actor, parent.site, &new, key.as_ref())
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::user_pb(&created)))
}

pub(super) async fn get(api: &AdminApi, request: Request<pb::GetUserRequest>) -> Res<pb::User> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, UserName::parse)?;
    let u = api
        .store
        .user_get(actor.dealer, name.site, name.user)
        .await
        .map_err(store_status)?;
    Ok(Response::new(res::user_pb(&u)))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListUsersRequest>,
) -> Res<pb::ListUsersResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, SiteName::parse)?;
    let (items, next_page_token) = list_page(
        &format!("ListUsers sites/{}", parent.site),
        req.page_size,
        &req.page_token,
        |u: &store::User| u.id.to_string(),
        |p| api.store.user_list(actor.dealer, parent.site, p),
    )
    .await?;
    Ok(Response::new(pb::ListUsersResponse {
        users: items.iter().map(res::user_pb).collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateUserRequest>,
) -> Res<pb::User> {
    let (actor, req) = dealer_call(request)?;
    let user = required("user", req.user.as_ref())?;
    let name = parse("user.name", &user.name, UserName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("display_name", !user.display_name.is_empty()),
            ("authorities", !user.authorities.is_empty()),
            ("open_close_reporting", user.open_close_reporting),
        ],
    )?;
    let mut patch = store::UserPatch::default();
    for p in &paths {
        match p.as_str() {
            "display_name" => {
                patch.display_name = Some(fields::display_name(
                    "user.display_name",
                    &user.display_name,
                )?)
            }
            "authorities" => {
                patch.authorities =
                    Some(fields::authorities("user.authorities", &user.authorities)?)
            }
            _ => patch.open_close_reporting = Some(user.open_close_reporting),
        }
    }
    let updated = api
        .store
        .user_update(&actor, name.site, name.user, &patch, &user.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(res::user_pb(&updated)))
}

pub(super) async fn delete(api: &AdminApi, request: Request<pb::DeleteUserRequest>) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, UserName::parse)?;
    api.store
        .user_delete(&actor, name.site, name.user, &req.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(()))
}
