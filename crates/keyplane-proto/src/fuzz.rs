//! Arbitrary wire messages for property tests and fuzzing on the stable toolchain:
//! any message of the API, built from its descriptor so that a new field or RPC is
//! fuzzed without a test being touched. The values come from a byte string the
//! caller draws (proptest shrinks it), so a failing case is small and replayable.
//!
//! Not part of the API (hidden from its docs): small enough to always compile, so
//! that tests enabling it do not rebuild the workspace with another feature set.

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use std::collections::HashMap;

/// A byte string read as a source of choices; exhausted, it answers zeros.
#[derive(Debug, Clone)]
pub struct Entropy<'a> {
    bytes: &'a [u8],
}

impl<'a> Entropy<'a> {
    /// Choices read from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Entropy { bytes }
    }

    /// The next byte (0 once exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((b, rest)) => {
                self.bytes = rest;
                *b
            }
            None => 0,
        }
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = u16::from_le_bytes([self.byte(), self.byte()]);
        usize::from(v) % n
    }

    /// The next eight bytes as a number.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    /// Up to `max` raw bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1).min(self.bytes.len());
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        taken.to_vec()
    }
}

#[derive(Debug, Clone)]
struct FieldShape {
    number: u32,
    name: String,
    repeated: bool,
    kind: Type,
    type_name: String,
}

/// A method of a service in the descriptor set.
#[derive(Debug, Clone)]
pub struct Method {
    /// The bare RPC name (`CreateCredential`).
    pub name: String,
    /// `/package.Service/Method`, the gRPC path.
    pub path: String,
    /// The request message's full name.
    pub input: String,
    /// Whether the client sends a stream.
    pub client_streaming: bool,
    /// Whether the server answers with a stream.
    pub server_streaming: bool,
}

/// The messages, enums and services of an encoded `FileDescriptorSet`.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    messages: HashMap<String, Vec<FieldShape>>,
    enums: HashMap<String, Vec<i32>>,
    services: HashMap<String, Vec<Method>>,
}

impl Schema {
    /// The schema of the keyplane API.
    pub fn keyplane() -> Result<Schema, prost::DecodeError> {
        Schema::decode(crate::FILE_DESCRIPTOR_SET)
    }

    /// The schema of an encoded descriptor set.
    pub fn decode(encoded: &[u8]) -> Result<Schema, prost::DecodeError> {
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        let mut schema = Schema::default();
        for file in &set.file {
            let package = file.package();
            for m in &file.message_type {
                schema.add_message(package, m);
            }
            for e in &file.enum_type {
                schema.add_enum(package, e);
            }
            for s in &file.service {
                let service = format!("{package}.{}", s.name());
                let methods = s
                    .method
                    .iter()
                    .map(|m| Method {
                        name: m.name().to_owned(),
                        path: format!("/{service}/{}", m.name()),
                        input: m.input_type().trim_start_matches('.').to_owned(),
                        client_streaming: m.client_streaming(),
                        server_streaming: m.server_streaming(),
                    })
                    .collect();
                schema.services.insert(service, methods);
            }
        }
        Ok(schema)
    }

    fn add_enum(&mut self, prefix: &str, e: &prost_types::EnumDescriptorProto) {
        let values = e.value.iter().map(|v| v.number()).collect();
        self.enums.insert(format!("{prefix}.{}", e.name()), values);
    }

    fn add_message(&mut self, prefix: &str, m: &prost_types::DescriptorProto) {
        let full = format!("{prefix}.{}", m.name());
        let fields = m
            .field
            .iter()
            .map(|f| FieldShape {
                number: u32::try_from(f.number()).unwrap_or(1),
                name: f.name().to_owned(),
                repeated: f.label() == Label::Repeated,
                kind: f.r#type(),
                type_name: f.type_name().trim_start_matches('.').to_owned(),
            })
            .collect();
        for nested in &m.nested_type {
            self.add_message(&full, nested);
        }
        for e in &m.enum_type {
            self.add_enum(&full, e);
        }
        self.messages.insert(full, fields);
    }

    /// The methods of `service` (its full name, `keyplane.v1.AdminService`).
    pub fn methods(&self, service: &str) -> &[Method] {
        self.services.get(service).map_or(&[], Vec::as_slice)
    }

    /// The field names of every message, for strings that look like field masks.
    pub fn field_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .messages
            .values()
            .flatten()
            .map(|f| f.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// An arbitrary encoding of message `type_name`: mostly well-formed with hostile
    /// values (names from `words`, extreme numbers, unknown enum values, long and
    /// odd strings), sometimes truncated or plain garbage.
    pub fn arbitrary(&self, type_name: &str, words: &[String], e: &mut Entropy<'_>) -> Vec<u8> {
        match e.byte() % 16 {
            0 => e.bytes(64),
            1 => {
                let mut m = self.message(type_name, words, e, 0, false);
                let keep = e.below(m.len() + 1);
                m.truncate(keep);
                m
            }
            2..=7 => self.message(type_name, words, e, 0, false),
            // Plausible values throughout: what gets past validation to the rules.
            _ => self.message(type_name, words, e, 0, true),
        }
    }

    fn message(
        &self,
        type_name: &str,
        words: &[String],
        e: &mut Entropy<'_>,
        depth: u8,
        plausible: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(fields) = self.messages.get(type_name) else {
            return out;
        };
        for f in fields {
            // Most fields are left out, as clients do, but the ones a request
            // cannot do without (its names, its resource) are mostly there; nesting
            // stays shallow.
            let wanted = is_reference(&f.name) || (f.kind == Type::Message && depth == 0);
            let present = if wanted {
                !e.byte().is_multiple_of(8)
            } else {
                e.byte().is_multiple_of(3)
            };
            if !present || (f.kind == Type::Message && depth >= 4) {
                continue;
            }
            let count = if f.repeated { 1 + e.below(4) } else { 1 };
            for _ in 0..count {
                self.field(f, words, e, (depth, plausible), &mut out);
            }
        }
        out
    }

    fn field(
        &self,
        f: &FieldShape,
        words: &[String],
        e: &mut Entropy<'_>,
        (depth, plausible): (u8, bool),
        out: &mut Vec<u8>,
    ) {
        match f.kind {
            Type::String => {
                encode_key(f.number, WireType::LengthDelimited, out);
                let s = text(&f.name, words, e, plausible);
                encode_varint(s.len() as u64, out);
                out.extend_from_slice(&s);
            }
            Type::Bytes => {
                encode_key(f.number, WireType::LengthDelimited, out);
                let b = e.bytes(80);
                encode_varint(b.len() as u64, out);
                out.extend_from_slice(&b);
            }
            Type::Message | Type::Group => {
                encode_key(f.number, WireType::LengthDelimited, out);
                let inner = self.message(&f.type_name, words, e, depth + 1, plausible);
                encode_varint(inner.len() as u64, out);
                out.extend_from_slice(&inner);
            }
            Type::Enum => {
                encode_key(f.number, WireType::Varint, out);
                let known = self.enums.get(&f.type_name).map_or(&[][..], Vec::as_slice);
                let v = match e.byte() % 4 {
                    0 if !plausible => i64::from(e.u64() as i32),
                    _ if !known.is_empty() => i64::from(known[e.below(known.len())]),
                    _ => 0,
                };
                encode_varint(v as u64, out);
            }
            Type::Double | Type::Fixed64 | Type::Sfixed64 => {
                encode_key(f.number, WireType::SixtyFourBit, out);
                out.extend_from_slice(&e.u64().to_le_bytes());
            }
            Type::Float | Type::Fixed32 | Type::Sfixed32 => {
                encode_key(f.number, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&(e.u64() as u32).to_le_bytes());
            }
            Type::Sint32 | Type::Sint64 => {
                encode_key(f.number, WireType::Varint, out);
                let v = number(e, plausible);
                encode_varint(((v << 1) ^ (v >> 63)) as u64, out);
            }
            Type::Bool => {
                encode_key(f.number, WireType::Varint, out);
                encode_varint(u64::from(e.byte() % 2), out);
            }
            Type::Int32 | Type::Int64 | Type::Uint32 | Type::Uint64 => {
                encode_key(f.number, WireType::Varint, out);
                encode_varint(number(e, plausible) as u64, out);
            }
        }
    }
}

/// Field names (singular) that hold a resource name besides `name` and `parent`.
const REFERENCE_FIELDS: &[&str] = &[
    "user",
    "device",
    "site",
    "credential",
    "plan",
    "lock",
    "door",
    "holiday",
    "partition_name",
];

/// Whether a field holds a resource name.
fn is_reference(field: &str) -> bool {
    field == "name"
        || field == "parent"
        || REFERENCE_FIELDS
            .iter()
            .any(|r| field.trim_end_matches('s') == *r)
}

/// A number a validator must handle: edges, small counts, or anything.
fn number(e: &mut Entropy<'_>, plausible: bool) -> i64 {
    if plausible {
        return i64::from(e.byte() % 32);
    }
    match e.byte() % 8 {
        0 => 0,
        1 => -1,
        2 => i64::from(i32::MAX),
        3 => i64::from(i32::MIN),
        4 => e.u64() as i64,
        5 => i64::from(e.byte()) + 256 * i64::from(e.byte() % 4),
        _ => i64::from(e.byte() % 32),
    }
}

/// A string a validator must handle: a known name (maybe with a tail), digits,
/// unicode, control characters, a very long one, or bytes that are not UTF-8.
fn text(field: &str, words: &[String], e: &mut Entropy<'_>, plausible: bool) -> Vec<u8> {
    // A field holding a resource name mostly gets one, so that cases get past the
    // lookups to the rules behind them.
    let reference = is_reference(field);
    let names: Vec<&String> = words.iter().filter(|w| w.contains('/')).collect();
    let word = |e: &mut Entropy<'_>| {
        if reference && !names.is_empty() && !e.byte().is_multiple_of(4) {
            return names[e.below(names.len())].clone();
        }
        words.get(e.below(words.len())).cloned().unwrap_or_default()
    };
    if plausible {
        return match e.byte() % 8 {
            0 => (0..4 + e.below(5)).map(|_| b'0' + e.byte() % 10).collect(),
            1 => Vec::new(),
            _ => word(e).into_bytes(),
        };
    }
    match e.byte() % 10 {
        0..=3 => word(e).into_bytes(),
        4 => {
            let mut w = word(e);
            w.push_str(["/", "/x", "-1", "%", "\u{0}", "/../x", "/*"][e.below(7)]);
            w.into_bytes()
        }
        5 => (0..e.below(13)).map(|_| b'0' + e.byte() % 10).collect(),
        6 => String::from_utf8_lossy(&e.bytes(24))
            .into_owned()
            .into_bytes(),
        7 => ["é🔑\u{202e}x", "\t\n ", "", " 1234 ", "sites/-/devices/-"][e.below(5)]
            .as_bytes()
            .to_vec(),
        8 => "x".repeat([300, 5_000, 70_000][e.below(3)]).into_bytes(),
        _ => e.bytes(16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyplane_schema_has_every_service_and_their_inputs() {
        let schema = Schema::keyplane().expect("descriptor set");
        let admin = schema.methods("keyplane.v1.AdminService");
        assert!(admin.len() > 40, "{} admin methods", admin.len());
        for m in admin
            .iter()
            .chain(schema.methods("keyplane.v1.AgentService"))
        {
            assert!(
                schema.messages.contains_key(&m.input),
                "{} takes unknown {}",
                m.name,
                m.input
            );
        }
    }

    #[test]
    fn arbitrary_messages_of_every_admin_request_mostly_decode() {
        let schema = Schema::keyplane().expect("descriptor set");
        let words = schema.field_names();
        let mut decoded = 0;
        let mut total = 0;
        for (i, m) in schema
            .methods("keyplane.v1.AdminService")
            .iter()
            .enumerate()
        {
            for seed in 0u8..20 {
                let bytes: Vec<u8> = (0..400u16)
                    .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8))
                    .collect();
                let wire = schema.arbitrary(&m.input, &words, &mut Entropy::new(&bytes));
                total += 1;
                if <() as Message>::decode(wire.as_slice()).is_ok() {
                    decoded += 1;
                }
            }
        }
        // Garbage and truncation are a minority: the server's validation, not
        // only its decoder, is what the cases reach.
        assert!(decoded * 2 > total, "{decoded} of {total} decoded");
    }
}
