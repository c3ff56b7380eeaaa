//! Credentials (PIN codes) of a user.

use super::*;

pub(super) async fn create(
    api: &AdminApi,
    request: Request<pb::CreateCredentialRequest>,
) -> Res<pb::Credential> {
    let (actor, req) = dealer_call(request)?;
    let parent = parse("parent", &req.parent, UserName::parse)?;
    let credential = required("credential", req.credential.as_ref())?;
    if req.generate_pin {
        return create_generated(api, actor, parent, credential, &req).await;
    }
    let new = new_credential(
        credential,
        fields::pin("credential.pin", &credential.pin)?,
        fields::scope(parent.site, credential.scope.as_ref())?,
    )?;
    let key = api.request_key("CreateCredential", &req.request_id, &req)?;
    let created = api
        .store
        .credential_create(&actor, parent.site, parent.user, &new, key.as_ref())
        .await
        .map_err(store_status)?;
    api.hub.poke(parent.site);
    Ok(Response::new(res::credential_pb(&created)))
}

/// The stored form of a requested credential, with its PIN and scope already
/// checked (given, or generated).
fn new_credential(
    credential: &pb::Credential,
    pin: keyplane_core::pin::Pin,
    scope: store::Scope,
) -> Result<store::NewCredential, Status> {
    Ok(store::NewCredential {
        display_name: if credential.display_name.is_empty() {
            "PIN".to_owned()
        } else {
            fields::display_name("credential.display_name", &credential.display_name)?
        },
        pin,
        scope,
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
        system_owner: false,
    })
}

/// A uniform draw from `0..n` from the OS's generator (rejection sampling, so no
/// value is favoured); None when the generator fails.
fn os_below(n: u32) -> Option<u32> {
    let n = n.max(1);
    let zone = u32::MAX - (u32::MAX % n);
    loop {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).ok()?;
        let v = u32::from_le_bytes(b);
        if v < zone {
            return Some(v % n);
        }
    }
}

/// Draws a fresh code when one drawn is already in use on a device in scope (the
/// store refuses it); rare, since codes are drawn from a million.
const GENERATION_ATTEMPTS: usize = 5;

/// CreateCredential with `generate_pin`: a code fitting every device in scope (its
/// constraints in force, reported ones included) and keyplane's policy, returned
/// once in this response.
async fn create_generated(
    api: &AdminApi,
    actor: store::Actor,
    parent: UserName,
    credential: &pb::Credential,
    req: &pb::CreateCredentialRequest,
) -> Res<pb::Credential> {
    if !credential.pin.is_empty() {
        return Err(Status::invalid_argument(
            "credential.pin must be empty when generate_pin is set",
        ));
    }
    let scope = fields::scope(parent.site, credential.scope.as_ref())?;
    let key = api.request_key("CreateCredential", &req.request_id, req)?;
    let code = GeneratedCode {
        parent,
        credential,
        scope: &scope,
        system_owner: false,
    };
    generated_credential(api, &actor, code, key.as_ref(), None).await
}

/// A credential to create with a generated code.
pub(super) struct GeneratedCode<'a> {
    /// Its user.
    pub parent: UserName,
    /// Its name and limits (its PIN is generated).
    pub credential: &'a pb::Credential,
    /// Where it goes.
    pub scope: &'a store::Scope,
    /// Held by a keyplane user (the backup pool's), not a person.
    pub system_owner: bool,
}

/// Creates `code` with a PIN generated to fit every device of its scope; the
/// response carries the PIN, once. `listed`: the site's devices, when the caller has
/// just read them (None: read here).
pub(super) async fn generated_credential(
    api: &AdminApi,
    actor: &store::Actor,
    code: GeneratedCode<'_>,
    key: Option<&store::RequestKey>,
    listed: Option<&[store::Device]>,
) -> Res<pb::Credential> {
    let GeneratedCode {
        parent,
        credential,
        scope,
        system_owner,
    } = code;
    let fetched;
    let devices = match listed {
        Some(devices) => devices,
        None => {
            fetched = api
                .store
                .device_list(
                    actor.dealer,
                    parent.site,
                    store::PageRequest {
                        after: None,
                        limit: 10_000,
                    },
                )
                .await
                .map_err(store_status)?;
            fetched.as_slice()
        }
    };
    // The devices the scope lands on (the store checks the scope itself on create).
    let targets: Vec<(String, keyplane_core::constraints::DeviceConstraints)> = devices
        .iter()
        .filter(|d| match d.kind() {
            keyplane_core::DeviceKind::Panel => !scope.panel_partitions.is_empty(),
            keyplane_core::DeviceKind::Lock => scope.locks.contains(&d.id),
            keyplane_core::DeviceKind::Door => scope.doors.contains(&d.id),
        })
        .map(|d| {
            (
                format!("{} ({})", d.display_name, d.name()),
                d.constraints(),
            )
        })
        .collect();
    let scope_refs: Vec<(&str, &keyplane_core::constraints::DeviceConstraints)> =
        targets.iter().map(|(n, c)| (n.as_str(), c)).collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut failed = false;
        let mut rng = |n: u32| {
            os_below(n).unwrap_or_else(|| {
                failed = true;
                0
            })
        };
        let generated =
            keyplane_core::constraints::generate_pin(&scope_refs, None, |_| true, &mut rng)
                .map_err(|e| Status::invalid_argument(format!("generate_pin: {e}")))?;
        if failed {
            return Err(Status::internal("the random generator failed"));
        }
        let new = store::NewCredential {
            system_owner,
            ..new_credential(credential, generated.clone(), scope.clone())?
        };
        match api
            .store
            .credential_create(actor, parent.site, parent.user, &new, key)
            .await
        {
            Ok(created) => {
                api.hub.poke(parent.site);
                let mut out = res::credential_pb(&created);
                // The one time this code is ever shown.
                out.pin = generated.expose().to_owned();
                return Ok(Response::new(out));
            }
            Err(store::StoreError::AlreadyExists(_)) if attempt < GENERATION_ATTEMPTS => continue,
            Err(e) => return Err(store_status(e)),
        }
    }
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
