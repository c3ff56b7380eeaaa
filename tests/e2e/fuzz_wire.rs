//! Issue 13, hostile input on the wire: arbitrary messages, built from the API's
//! descriptor (keyplane_proto::fuzz) so that every RPC is reached, including ones
//! added later, at every AdminService method and at the agent's Sync stream.
//! Each gets a clean status (never INTERNAL, UNKNOWN, UNIMPLEMENTED, UNAVAILABLE or
//! a dropped connection); a refused call changes nothing; whatever an agent sends
//! never changes what the API owns. Cases: 64 and 24 in CI; `PROPTEST_CASES=5000`
//! by hand.

use crate::bad_input::{Fingerprint, fingerprint_with};
use crate::fixture::Site;
use keyplane_proto::fuzz::{Entropy, Method, Schema};
use keyplane_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::bytes::{Buf, BufMut};
use std::time::Duration;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Messages passed as the bytes they are on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(ci)
}

fn unclean(code: Code) -> bool {
    matches!(
        code,
        Code::Internal | Code::Unknown | Code::Unimplemented | Code::Unavailable
    )
}

/// `words` weighted towards names of the collection `method` is about (and their
/// parents), so that more cases reach the rules behind the lookups.
fn favoured(method: &str, words: &[String]) -> Vec<String> {
    const VERBS: &[&str] = &[
        "Get",
        "List",
        "Create",
        "Update",
        "Delete",
        "Put",
        "Erase",
        "Claim",
        "Remove",
        "Resolve",
        "Pull",
        "Configure",
        "Clear",
        "Watch",
    ];
    let noun = VERBS
        .iter()
        .find_map(|v| method.strip_prefix(v))
        .unwrap_or(method);
    let mut chars = noun.chars();
    let segment = match chars.next() {
        Some(first) => format!("/{}{}s/", first.to_lowercase(), chars.as_str()),
        None => return words.to_vec(),
    };
    let mut out = words.to_vec();
    for w in words {
        let slashed = format!("/{w}");
        if let Some(i) = slashed.find(&segment) {
            out.extend(std::iter::repeat_n(w.clone(), 8));
            if i > 0 {
                out.extend(std::iter::repeat_n(slashed[1..i].to_owned(), 8));
            }
        }
    }
    out
}

/// Names a request can point at: the fixture's own resources (so that some calls
/// get past the lookups to the rules), other shapes, and every field name (masks).
fn words(s: &Site, schema: &Schema) -> Vec<String> {
    let mut words = vec![
        s.site.clone(),
        s.alice.clone(),
        s.lock.name.clone(),
        s.panel.name.clone(),
        format!("{}/partitions/1", s.site),
        format!("{}/localCodes/3", s.lock.name),
        format!("{}/holidays/2026-12-25", s.site),
        format!("{}/credentials/1", s.site),
        format!("{}/accessPlans/1", s.site),
        "sites/-".into(),
        "sites/999999".into(),
        "vista-128bpt".into(),
        "zwave-lock-30".into(),
        "4821".into(),
        "482".into(),
        "Europe/Paris".into(),
        "2026-12-25T10:00:00Z".into(),
        "*".into(),
    ];
    words.extend(schema.field_names());
    words
}

async fn call(
    s: &Site,
    method: &Method,
    body: Vec<u8>,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let channel = s.server.channel().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", s.token).parse()?);
    let path = PathAndQuery::try_from(method.path.as_str())?;
    if method.server_streaming {
        let response = match grpc.server_streaming(request, path, Raw).await {
            Ok(r) => r,
            Err(status) => return Ok(Err(status)),
        };
        // A watch that was accepted waits for events: its first answer, or a
        // moment of silence, is all this needs.
        let mut stream = response.into_inner();
        return Ok(
            match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                Ok(Err(status)) => Err(status),
                _ => Ok(()),
            },
        );
    }
    Ok(grpc.unary(request, path, Raw).await.map(|_| ()))
}

#[test]
fn every_admin_method_takes_arbitrary_messages_cleanly_and_refusals_change_nothing()
-> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let schema = Schema::keyplane()?;
    let methods: Vec<Method> = schema.methods("keyplane.v1.AdminService").to_vec();
    anyhow::ensure!(
        methods.len() > 40,
        "AdminService has {} methods",
        methods.len()
    );
    let mut s = rt.block_on(Site::new())?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let credential =
        rt.block_on(s.credential(&alice, "7391", crate::fixture::lock_scope(&[&lock])))?;
    let mut words = words(&s, &schema);
    words.push(credential.name);
    let words: Vec<Vec<String>> = methods.iter().map(|m| favoured(&m.name, &words)).collect();
    let mut baseline: Fingerprint = rt.block_on(fingerprint_with(&s, false))?;
    let mut runner = TestRunner::new(Config {
        cases: cases(64),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0..methods.len(),
        proptest::collection::vec(any::<u8>(), 0..600),
    );
    let baseline_cell = std::cell::RefCell::new(&mut baseline);
    // How far the cases got (printed, to judge the generator by hand).
    let outcomes = std::cell::RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    let result = runner.run(&strategy, |(index, entropy)| {
        let method = &methods[index];
        let body = schema.arbitrary(&method.input, &words[index], &mut Entropy::new(&entropy));
        let outcome = rt.block_on(async {
            let r = call(&s, method, body).await.map_err(|e| format!("{e:#}"))?;
            let after = fingerprint_with(&s, false)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((r, after))
        });
        let (r, after) = outcome.map_err(TestCaseError::fail)?;
        let mut baseline = baseline_cell.borrow_mut();
        let code = r.as_ref().err().map_or(Code::Ok, tonic::Status::code);
        *outcomes
            .borrow_mut()
            .entry(format!("{code:?}"))
            .or_default() += 1;
        match r {
            Ok(()) => **baseline = after,
            Err(e) => {
                prop_assert!(
                    !unclean(e.code()),
                    "{}: unclean status {:?}: {}",
                    method.name,
                    e.code(),
                    e.message()
                );
                prop_assert!(
                    !e.message().is_empty(),
                    "{}: {:?} without a message",
                    method.name,
                    e.code()
                );
                prop_assert!(
                    after == **baseline,
                    "{} refused ({:?}: {}) but the database changed",
                    method.name,
                    e.code(),
                    e.message()
                );
            }
        }
        Ok(())
    });
    eprintln!("outcomes: {:?}", outcomes.borrow());
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Tables only the API writes: nothing an agent sends may change them.
const API_OWNED: &[&str] = &[
    "dealer",
    "partition",
    "site_user",
    "user_authority",
    "credential",
    "credential_partition",
    "credential_device",
    "access_plan",
    "personal_access_plan",
    "personal_access_point",
    "holiday",
    "agent_token",
];

fn api_owned(f: &Fingerprint) -> Vec<(&String, &String)> {
    f.tables
        .iter()
        .filter(|(t, _)| API_OWNED.contains(&t.as_str()))
        .collect()
}

/// Sends `messages` on a Sync stream with the site's agent token and closes it;
/// the server's final status, if it ended with one.
async fn sync_with(s: &Site, messages: Vec<Vec<u8>>) -> anyhow::Result<Option<tonic::Status>> {
    let channel = s.server.channel().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
    for m in messages {
        tx.send(m).await?;
    }
    drop(tx);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", s.agent_token).parse()?,
    );
    let response = match grpc
        .streaming(
            request,
            PathAndQuery::from_static("/keyplane.v1.AgentService/Sync"),
            Raw,
        )
        .await
    {
        Ok(r) => r,
        Err(status) => return Ok(Some(status)),
    };
    let mut inbound = response.into_inner();
    // The agent's side is closed: the server must end the stream by itself.
    loop {
        match tokio::time::timeout(Duration::from_secs(20), inbound.message()).await {
            Err(_) => anyhow::bail!("the server held a stream its agent had closed"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(status)) => return Ok(Some(status)),
        }
    }
}

#[test]
fn the_agent_stream_takes_arbitrary_messages_cleanly_and_never_changes_what_the_api_owns()
-> anyhow::Result<()> {
    use prost::Message;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let schema = Schema::keyplane()?;
    let mut s = rt.block_on(Site::new())?;
    let words = words(&s, &schema);
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            site: s.site.clone(),
            agent_version: "fuzz".into(),
            protocol_version: keyplane_core::compat::PROTOCOL_VERSION,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let before = rt.block_on(fingerprint_with(&s, true))?;
    let mut runner = TestRunner::new(Config {
        cases: cases(24),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 1..6),
    );
    let result = runner.run(&strategy, |(says_hello, entropies)| {
        // Past a proper Hello, the session's own handling is what is fuzzed;
        // without one, the Hello's.
        let mut messages: Vec<Vec<u8>> = Vec::new();
        if says_hello {
            messages.push(hello.clone());
        }
        for entropy in &entropies {
            messages.push(schema.arbitrary(
                "keyplane.v1.AgentMessage",
                &words,
                &mut Entropy::new(entropy),
            ));
        }
        let (ended, after) = rt
            .block_on(async {
                let ended = sync_with(&s, messages).await?;
                let after = fingerprint_with(&s, true).await?;
                anyhow::Ok((ended, after))
            })
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        if let Some(status) = ended {
            prop_assert!(
                !unclean(status.code()),
                "unclean status {:?}: {}",
                status.code(),
                status.message()
            );
        }
        prop_assert_eq!(api_owned(&after), api_owned(&before));
        Ok(())
    });
    result.map_err(|e| anyhow::anyhow!("{e}"))?;
    // The server still serves the site's real agent.
    rt.block_on(async {
        let agent = s.start_agent();
        s.wait_synced().await?;
        agent.stop().await
    })
}
