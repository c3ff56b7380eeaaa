//! Issue 14, versions: the previous agent protocol's messages, sent as raw protobuf
//! shaped like the previous release (a Hello without `protocol_version`, `agent_time`
//! and `tzdb_version`), are served by the current server; a server whose minimum
//! protocol was raised refuses them with FAILED_PRECONDITION naming the minimum and
//! the fix; a newer agent (unknown fields, a higher protocol) is served with what the
//! server knows. The policy: docs/ARCHITECTURE.md, "Agent and server versions".

use crate::fixture::{SYNC_TIMEOUT, Site};
use keyplane_core::compat::PROTOCOL_VERSION;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestServer, eventually};
use tonic::codegen::http::uri::PathAndQuery;

/// The agent messages of protocol 1 (the release before `protocol_version`), and of a
/// hypothetical newer protocol, written out by hand as their releases define them.
mod wire {
    /// Hello as protocol 1 defines it: fields 1-4 only.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PreviousHello {
        #[prost(string, tag = "1")]
        pub site: String,
        #[prost(int64, tag = "2")]
        pub applied_revision: i64,
        #[prost(message, repeated, tag = "3")]
        pub inventory: Vec<PreviousInventoryDevice>,
        #[prost(string, tag = "4")]
        pub agent_version: String,
    }

    /// InventoryDevice as protocol 1 defines it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PreviousInventoryDevice {
        #[prost(string, tag = "1")]
        pub device: String,
        #[prost(int32, tag = "2")]
        pub kind: i32,
        #[prost(string, tag = "3")]
        pub model: String,
    }

    /// A newer Hello: this server's fields plus one it does not know (tag 99).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NewerHello {
        #[prost(string, tag = "1")]
        pub site: String,
        #[prost(int64, tag = "2")]
        pub applied_revision: i64,
        #[prost(string, tag = "4")]
        pub agent_version: String,
        #[prost(int32, tag = "5")]
        pub protocol_version: i32,
        #[prost(string, tag = "99")]
        pub something_newer: String,
    }

    /// Ack, unchanged since protocol 1.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(string, tag = "1")]
        pub device: String,
        #[prost(int64, tag = "2")]
        pub revision: i64,
    }

    /// AgentMessage with the oneof members these tests send.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AgentMessage {
        #[prost(oneof = "Msg", tags = "1, 2")]
        pub msg: Option<Msg>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Msg {
        #[prost(message, tag = "1")]
        PreviousHello(PreviousHello),
        #[prost(message, tag = "2")]
        Ack(Ack),
    }

    /// AgentMessage carrying the newer Hello.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NewerAgentMessage {
        #[prost(message, optional, tag = "1")]
        pub hello: Option<NewerHello>,
    }
}

/// Opens Sync on `server` with hand-encoded messages of type `M`; keep the sender.
async fn raw_sync<M: prost::Message + Send + Sync + 'static>(
    server: &TestServer,
    agent_token: &str,
    first: M,
) -> Result<
    (
        tonic::Response<tonic::Streaming<pb::ServerMessage>>,
        tokio::sync::mpsc::Sender<M>,
    ),
    tonic::Status,
> {
    let channel = server
        .channel()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(first)
        .await
        .map_err(|_| tonic::Status::internal("queue"))?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {agent_token}")
            .parse()
            .map_err(|_| tonic::Status::internal("token"))?,
    );
    let codec = tonic_prost::ProstCodec::<M, pb::ServerMessage>::default();
    let response = grpc
        .streaming(
            request,
            PathAndQuery::from_static("/keyplane.v1.AgentService/Sync"),
            codec,
        )
        .await?;
    Ok((response, tx))
}

fn previous_hello(s: &Site) -> wire::AgentMessage {
    wire::AgentMessage {
        msg: Some(wire::Msg::PreviousHello(wire::PreviousHello {
            site: s.site.clone(),
            applied_revision: 0,
            inventory: vec![wire::PreviousInventoryDevice {
                device: s.lock.name.clone(),
                kind: pb::DeviceKind::Lock as i32,
                model: s.lock.model.clone(),
            }],
            agent_version: "0.1.0-previous".into(),
        })),
    }
}

#[tokio::test]
async fn the_previous_protocol_is_served() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    s.credential(&alice, "7391", crate::fixture::lock_scope(&[&lock]))
        .await?;
    let (response, tx) = raw_sync(&s.server, &s.agent_token, previous_hello(&s)).await?;
    let served = response
        .metadata()
        .get(keyplane_server::agent::PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(served, Some(PROTOCOL_VERSION.to_string()));
    let mut inbound = response.into_inner();
    let snapshot = match inbound.message().await?.and_then(|m| m.msg) {
        Some(pb::server_message::Msg::Snapshot(snapshot)) => snapshot,
        other => anyhow::bail!("expected a snapshot, got {other:?}"),
    };
    assert!(snapshot.slots.iter().any(|d| d.device == lock.name));
    // Acks in the previous protocol's shape are taken.
    for device in &snapshot.devices {
        tx.send(wire::AgentMessage {
            msg: Some(wire::Msg::Ack(wire::Ack {
                device: device.name.clone(),
                revision: snapshot.revision,
            })),
        })
        .await?;
    }
    let status = s.wait_synced().await?;
    let hello = status
        .agent
        .ok_or_else(|| anyhow::anyhow!("the previous agent's Hello is shown"))?;
    assert_eq!(hello.protocol_version, 1);
    assert_eq!(hello.agent_version, "0.1.0-previous");
    assert!(hello.agent_time.is_none(), "protocol 1 reports no clock");
    assert!(hello.tzdb_version.is_empty());
    assert!(
        status.site_issues.is_empty(),
        "an unreported clock is not flagged"
    );
    drop(tx);
    Ok(())
}

#[tokio::test]
async fn a_raised_minimum_refuses_the_previous_protocol_clearly() -> anyhow::Result<()> {
    let server = TestServer::start_tweaked(&|c| c.min_agent_protocol = PROTOCOL_VERSION).await?;
    let mut s = Site::on_server(server, "zwave-lock-30").await?;
    let refused = match raw_sync(&s.server, &s.agent_token, previous_hello(&s)).await {
        Err(status) => status,
        Ok((response, _tx)) => match response.into_inner().message().await {
            Err(status) => status,
            Ok(m) => anyhow::bail!("a too-old agent was served: {m:?}"),
        },
    };
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let m = refused.message();
    assert!(m.contains("agent protocol 1"), "{m}");
    assert!(
        m.contains(&format!(
            "serves protocols {PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        )),
        "{m}"
    );
    assert!(m.contains("upgrade keyplane-agent"), "{m}");
    // Refused before anything was recorded: no Hello shown.
    assert!(s.sync_status().await?.agent.is_none());
    // The current agent is served by the same server.
    let agent = s.start_agent();
    s.wait_synced().await?;
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    eventually("the current agent's Hello shown", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let name = name.clone();
        async move {
            let st = admin
                .get_sync_status(pb::GetSyncStatusRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(st
                .agent
                .filter(|a| a.protocol_version == PROTOCOL_VERSION)
                .map(|_| ()))
        }
    })
    .await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_newer_agent_is_served_with_what_the_server_knows() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let newer = wire::NewerAgentMessage {
        hello: Some(wire::NewerHello {
            site: s.site.clone(),
            applied_revision: 0,
            agent_version: "9.9.9".into(),
            protocol_version: PROTOCOL_VERSION + 1,
            something_newer: "ignored by this server".into(),
        }),
    };
    let (response, tx) = raw_sync(&s.server, &s.agent_token, newer).await?;
    let mut inbound = response.into_inner();
    match inbound.message().await?.and_then(|m| m.msg) {
        Some(pb::server_message::Msg::Snapshot(_)) => {}
        other => anyhow::bail!("expected a snapshot, got {other:?}"),
    }
    let hello = s
        .sync_status()
        .await?
        .agent
        .ok_or_else(|| anyhow::anyhow!("the newer agent's Hello is shown"))?;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION + 1);
    drop(tx);
    Ok(())
}
