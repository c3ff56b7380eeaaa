//! Credentials (PIN codes) of a user.

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateCredentialRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, UserName::parse)?;
    let credential = required("credential", req.credential.as_ref())?;
    let new = store::NewCredential {
        display_name: if credential.display_name.is_empty() {
            "PIN".to_owned()
        } else {
            fields::display_name("credential.display_name", &credential.display_name)?
        },
        pin: fields::pin("credential.pin", &credential.pin)?,
        scope: fields::scope(parent.site, credential.scope.as_ref())?,
        valid_from: credential
            .valid_from_time
            .as_ref()
            .map(|t| fields::timestamp("credential.valid_from_time", t))
            .transpose()?,
        valid_until: credential
            .valid_until_time
            .as_ref()
            .map(|t| fields::timestamp("credential.valid_until_time", t))
            .transpose()?,
        max_uses: match credential.max_uses {
            0 => None,
            n if n < 0 => {
                return Err(Status::invalid_argument(
                    "credential.max_uses must not be negative",
                ));
            }
            n => Some(n),
        },
    };
    let key = api.request_key("CreateCredential", &req.request_id, &req)?;
    let created = api
        .store
        .credential_create(&actor, parent.site, parent.user, &new, key.as_ref())
        .await
        .map_err(store_status)?;
    api.hub.poke(parent.site);
    Ok(Response::new(res::credential_pb(&created)))
}

pub(super) async fn get(
    api: &AdminApi,
    request: Request<pb::GetCredentialRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, CredentialName::parse)?;
    let (c, facts) = tokio::try_join!(
        api.store
            .credential_get(actor.dealer, name.site, name.user, name.credential),
        api.store
            .slot_status_facts(actor.dealer, name.site, Some(name.user)),
    )
    .map_err(store_status)?;
    let states = res::slot_states(&facts);
    Ok(Response::new(res::credential_status_pb(&c, Some(&states))))
}

pub(super) async fn list(
    api: &AdminApi,
    request: Request<pb::ListCredentialsRequest>,
) -> Res<pb::ListCredentialsResponse> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, UserName::parse)?;
    let (items, next_page_token) = list_page(
        &format!(
            "ListCredentials sites/{}/users/{}",
            parent.site, parent.user
        ),
        req.page_size,
        &req.page_token,
        |c: &store::Credential| c.id.to_string(),
        |p| {
            api.store
                .credential_list(actor.dealer, parent.site, parent.user, p)
        },
    )
    .await?;
    let facts = api
        .store
        .slot_status_facts(actor.dealer, parent.site, Some(parent.user))
        .await
        .map_err(store_status)?;
    let states = res::slot_states(&facts);
    Ok(Response::new(pb::ListCredentialsResponse {
        credentials: items
            .iter()
            .map(|c| res::credential_status_pb(c, Some(&states)))
            .collect(),
        next_page_token,
    }))
}

pub(super) async fn update(
    api: &AdminApi,
    request: Request<pb::UpdateCredentialRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let credential = required("credential", req.credential.as_ref())?;
    let name = parse("credential.name", &credential.name, CredentialName::parse)?;
    let paths = mask_paths(
        req.update_mask.as_ref(),
        &[
            ("display_name", !credential.display_name.is_empty()),
            ("pin", !credential.pin.is_empty()),
            ("scope", credential.scope.is_some()),
        ],
    )?;
    let mut patch = store::CredentialPatch::default();
    for p in &paths {
        match p.as_str() {
            "display_name" => {
                patch.display_name = Some(fields::display_name(
                    "credential.display_name",
                    &credential.display_name,
                )?)
            }
            "pin" => patch.pin = Some(fields::pin("credential.pin", &credential.pin)?),
            _ => patch.scope = Some(fields::scope(name.site, credential.scope.as_ref())?),
        }
    }
    let updated = api
        .store
        .credential_update(
            &actor,
            name.site,
            name.user,
            name.credential,
            &patch,
            &credential.etag,
        )
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(res::credential_pb(&updated)))
}

pub(super) async fn delete(
    api: &AdminApi,
    request: Request<pb::DeleteCredentialRequest>,
) -> Res<()> {
    let (actor, req) = dealer_call(request)?;
    let name = parse("name", &req.name, CredentialName::parse)?;
    api.store
        .credential_delete(&actor, name.site, name.user, name.credential, &req.etag)
        .await
        .map_err(store_status)?;
    api.hub.poke(name.site);
    Ok(Response::new(()))
}
