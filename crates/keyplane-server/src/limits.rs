//! Length limits on every string and list of every AdminService request (issue 13).
//!
//! Checked on each request as decoded, against the API's own descriptors: every
//! string, bytes and repeated field of the request and of the messages inside it is
//! bounded, a field added later included. [`STRING_LIMITS`] and [`LIST_LIMITS`] name
//! the fields whose bound differs from the defaults. A request over a bound is
//! INVALID_ARGUMENT naming the field (its path in the request) and the bound, and
//! reaches no handler, so it changes nothing.

use prost::Message;
use std::collections::HashMap;
use std::sync::OnceLock;
use tonic::Status;

/// Characters of a string field not named in [`STRING_LIMITS`].
pub const DEFAULT_STRING: usize = 1024;
/// Items of a repeated field not named in [`LIST_LIMITS`].
pub const DEFAULT_LIST: usize = 1000;

/// String (and bytes) fields whose bound is not [`DEFAULT_STRING`], by field name
/// wherever it appears.
pub const STRING_LIMITS: &[(&str, usize)] = &[
    ("display_name", 200),
    ("name", 256),
    ("parent", 256),
    ("user", 256),
    ("device", 256),
    ("site", 256),
    ("credential", 256),
    ("pin", 32),
    ("etag", 64),
    ("request_id", 128),
    ("time_zone", 64),
    ("page_token", 512),
    ("actor", 512),
    ("filter", 512),
];

/// Repeated fields whose bound is not [`DEFAULT_LIST`], by field name.
pub const LIST_LIMITS: &[(&str, usize)] = &[
    ("paths", 16),
    ("authorities", 64),
    ("devices", 256),
    ("partitions", 64),
    ("access_points", 256),
    ("schedules", 64),
    ("windows", 64),
    ("days", 7),
];

fn string_limit(field: &str) -> usize {
    STRING_LIMITS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(DEFAULT_STRING, |(_, n)| *n)
}

fn list_limit(field: &str) -> usize {
    LIST_LIMITS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(DEFAULT_LIST, |(_, n)| *n)
}

/// What the walk needs of one field.
struct Field {
    name: String,
    repeated: bool,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Text,
    Bytes,
    Message(String),
    Scalar,
}

struct Schema {
    /// Message full name (`keyplane.v1.CreateUserRequest`) -> field number -> field.
    messages: HashMap<String, HashMap<u32, Field>>,
    /// AdminService method name -> its request message's full name.
    methods: HashMap<String, String>,
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        use prost_types::field_descriptor_proto::{Label, Type};
        let mut messages = HashMap::new();
        let mut methods = HashMap::new();
        let set = prost_types::FileDescriptorSet::decode(keyplane_proto::FILE_DESCRIPTOR_SET)
            .unwrap_or_default();
        fn add(
            prefix: &str,
            m: &prost_types::DescriptorProto,
            out: &mut HashMap<String, HashMap<u32, Field>>,
        ) {
            let full = format!("{prefix}.{}", m.name());
            let mut fields = HashMap::new();
            for f in &m.field {
                let kind = match f.r#type() {
                    Type::String => Kind::Text,
                    Type::Bytes => Kind::Bytes,
                    Type::Message => {
                        Kind::Message(f.type_name().trim_start_matches('.').to_owned())
                    }
                    _ => Kind::Scalar,
                };
                fields.insert(
                    u32::try_from(f.number()).unwrap_or(0),
                    Field {
                        name: f.name().to_owned(),
                        repeated: f.label() == Label::Repeated,
                        kind,
                    },
                );
            }
            for nested in &m.nested_type {
                add(&full, nested, out);
            }
            out.insert(full, fields);
        }
        for file in &set.file {
            for m in &file.message_type {
                add(file.package(), m, &mut messages);
            }
            for s in &file.service {
                if s.name() == "AdminService" {
                    for m in &s.method {
                        methods.insert(
                            m.name().to_owned(),
                            m.input_type().trim_start_matches('.').to_owned(),
                        );
                    }
                }
            }
        }
        Schema { messages, methods }
    })
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn too_long(path: &str, limit: usize, what: &str) -> Status {
    Status::invalid_argument(format!(
        "{path} is too long: at most {limit} {what} (see docs/SECURITY.md, limits)"
    ))
}

/// Checks one encoded message of type `message` (fields reported under `prefix`).
fn walk(
    schema: &Schema,
    message: &str,
    mut buf: &[u8],
    prefix: &str,
    depth: usize,
) -> Result<(), Status> {
    // The API nests a handful of levels; anything deeper is not a request of ours.
    if depth > 16 {
        return Err(Status::invalid_argument(format!(
            "{prefix} nests too deeply"
        )));
    }
    let Some(fields) = schema.messages.get(message) else {
        return Ok(());
    };
    let malformed = || Status::invalid_argument("the request is not a valid protobuf message");
    let mut counts: HashMap<u32, usize> = HashMap::new();
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or_else(malformed)?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed())?;
        let field = fields.get(&number);
        let path = |i: Option<usize>| {
            let name = field.map_or_else(|| number.to_string(), |f| f.name.clone());
            let base = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            match i {
                Some(i) => format!("{base}[{i}]"),
                None => base,
            }
        };
        let index = counts.entry(number).or_default();
        let at = field.filter(|f| f.repeated).map(|_| *index);
        match key & 7 {
            0 => {
                varint(&mut buf).ok_or_else(malformed)?;
                *index += 1;
            }
            1 => {
                take(&mut buf, 8).ok_or_else(malformed)?;
                *index += 1;
            }
            5 => {
                take(&mut buf, 4).ok_or_else(malformed)?;
                *index += 1;
            }
            2 => {
                let len = usize::try_from(varint(&mut buf).ok_or_else(malformed)?)
                    .map_err(|_| malformed())?;
                let data = take(&mut buf, len).ok_or_else(malformed)?;
                match field.map(|f| (f.kind.clone(), f.name.as_str())) {
                    Some((Kind::Text, name)) => {
                        let limit = string_limit(name);
                        let chars =
                            std::str::from_utf8(data).map_or(data.len(), |s| s.chars().count());
                        if chars > limit {
                            return Err(too_long(&path(at), limit, "characters"));
                        }
                        *index += 1;
                    }
                    Some((Kind::Bytes, name)) => {
                        let limit = string_limit(name);
                        if data.len() > limit * 4 {
                            return Err(too_long(&path(at), limit * 4, "bytes"));
                        }
                        *index += 1;
                    }
                    Some((Kind::Message(inner), _)) => {
                        let inner_path = path(at);
                        *index += 1;
                        walk(schema, &inner, data, &inner_path, depth + 1)?;
                    }
                    // Packed scalars: each element is at least one byte.
                    Some((Kind::Scalar, _)) => *index += data.len().max(1),
                    None => *index += 1,
                }
            }
            _ => return Err(malformed()),
        }
    }
    for (number, count) in counts {
        if let Some(f) = fields.get(&number).filter(|f| f.repeated) {
            let limit = list_limit(&f.name);
            if count > limit {
                let name = if prefix.is_empty() {
                    f.name.clone()
                } else {
                    format!("{prefix}.{}", f.name)
                };
                return Err(Status::invalid_argument(format!(
                    "{name} has too many items: at most {limit} (see docs/SECURITY.md, limits)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks the request of AdminService `method` against the limits.
pub fn check<T: Message>(method: &str, request: &T) -> Result<(), Status> {
    let schema = schema();
    let Some(message) = schema.methods.get(method) else {
        return Ok(());
    };
    walk(schema, message, &request.encode_to_vec(), "", 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_proto::v1 as pb;

    #[test]
    fn every_admin_method_has_a_request_schema() {
        let s = schema();
        assert!(s.methods.len() > 40, "{}", s.methods.len());
        for message in s.methods.values() {
            assert!(s.messages.contains_key(message), "{message}");
        }
    }

    #[test]
    fn limits_name_the_field_and_the_bound() {
        let ok = pb::CreateUserRequest {
            parent: "sites/x".into(),
            user: Some(pb::User {
                display_name: "é".repeat(200),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check("CreateUser", &ok).is_ok());
        type Case = (
            &'static str,
            Box<dyn Fn() -> Result<(), Status>>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "a display name over 200 characters",
                Box::new(|| {
                    check(
                        "CreateUser",
                        &pb::CreateUserRequest {
                            user: Some(pb::User {
                                display_name: "a".repeat(201),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )
                }),
                "user.display_name is too long: at most 200 characters",
            ),
            (
                "a name over 256",
                Box::new(|| {
                    check(
                        "GetSite",
                        &pb::GetSiteRequest {
                            name: "s".repeat(257),
                        },
                    )
                }),
                "name is too long: at most 256 characters",
            ),
            (
                "too many mask paths",
                Box::new(|| {
                    check(
                        "UpdateSite",
                        &pb::UpdateSiteRequest {
                            site: None,
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["display_name".into(); 17],
                            }),
                        },
                    )
                }),
                "update_mask.paths has too many items: at most 16",
            ),
            (
                "too many levels",
                Box::new(|| {
                    check(
                        "CreateUser",
                        &pb::CreateUserRequest {
                            user: Some(pb::User {
                                authorities: vec![pb::PartitionAuthority::default(); 65],
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )
                }),
                "user.authorities has too many items: at most 64",
            ),
        ];
        for (what, call, want) in cases {
            let err = call().expect_err(what);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
            assert!(err.message().starts_with(want), "{what}: {}", err.message());
        }
    }
}
