//! TLS on real sockets with certificates made by the test: keyplaned refuses plaintext
//! off loopback, a TLS server refuses plaintext clients, and the agent trusts only the
//! CA it is given.

use crate::fixture::{Site, lock_scope};
use keyplane_testkit::server::{TestPki, TestServer, eventually};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn keyplaned_refuses_to_serve_plaintext_off_loopback() -> anyhow::Result<()> {
    let key = keyplane_store::PinKey::generate()?;
    let config = keyplane_server::Config::new("postgres://nobody@127.0.0.1:1/none", key);
    // Bound, never connected to: the refusal comes before the first accept.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let e = keyplane_server::serve(config, listener, CancellationToken::new())
        .await
        .expect_err("plaintext on 0.0.0.0");
    let text = format!("{e:#}");
    assert!(text.contains("refusing to serve plaintext"), "{text}");
    assert!(text.contains("--tls-cert-file"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_tls_server_refuses_a_plaintext_client() -> anyhow::Result<()> {
    let server = TestServer::start_tls().await?;
    server.channel().await?;
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext call to a TLS server must fail");
    server.stop().await
}

#[tokio::test]
async fn the_agent_refuses_a_server_it_does_not_trust() -> anyhow::Result<()> {
    let site = Site::tls().await?;
    let stranger = TestPki::new()?;
    let mut config = site.agent_config();
    config.check()?;
    // The right CA: connects.
    keyplane_agent::endpoint(&config, None)?.connect().await?;
    // Another CA: the handshake fails on the server's certificate.
    config.server_ca_file = Some(stranger.ca_cert_file());
    let e = keyplane_agent::endpoint(&config, None)?
        .connect()
        .await
        .expect_err("untrusted server");
    let mut chain = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        chain.push(c.to_string());
        cause = c.source();
    }
    let chain = chain.join(": ");
    assert!(
        chain.contains("certificate") || chain.contains("UnknownIssuer"),
        "{chain}"
    );
    Ok(())
}

#[tokio::test]
async fn an_agent_over_tls_programs_its_devices() -> anyhow::Result<()> {
    let mut site = Site::tls().await?;
    let agent = site.start_agent();
    let lock = site.lock.clone();
    let alice = site.alice.clone();
    let cred = site
        .credential(&alice, "9930", lock_scope(&[&lock]))
        .await?;
    let slot = crate::fixture::slot_on(&cred, &lock).ok_or_else(|| anyhow::anyhow!("no slot"))?;
    eventually("the lock holds the code", Duration::from_secs(20), || {
        let slots = site.slots(&lock);
        async move { Ok(slots?.get(&slot).filter(|c| *c == "9930").map(|_| ())) }
    })
    .await?;
    agent.stop().await
}

#[tokio::test]
async fn a_replica_with_a_missing_or_different_ca_key_refuses_to_start() -> anyhow::Result<()> {
    let server = TestServer::start_tls().await?;
    server.channel().await?;
    let recorded = server
        .pki
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("tls"))?
        .ca
        .key_id()
        .to_owned();
    let other = TestPki::new()?;
    for (ca, words) in [
        (Some(other.ca.clone()), "but the configured CA key is"),
        (None, "no CA key is configured"),
    ] {
        let mut config =
            keyplane_server::Config::new(server.db.url.clone(), server.store.key().clone());
        config.tls = Some(other.server_tls()?);
        config.ca = ca;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let e = keyplane_server::serve(config, listener, CancellationToken::new())
            .await
            .expect_err("refused");
        let text = format!("{e:#}");
        assert!(
            text.contains(&recorded),
            "names the recorded CA key: {text}"
        );
        assert!(text.contains(words), "{text}");
    }
    server.stop().await
}

#[tokio::test]
async fn postgres_sslmode_is_honoured() -> anyhow::Result<()> {
    // The test cluster serves no TLS: `require` must refuse it rather than fall back
    // to plaintext, `prefer` and `disable` connect.
    let server = TestServer::start().await?;
    let pki = TestPki::new()?;
    let ca = pki.ca_cert_file();
    let url = &server.db.url;
    let sep = if url.contains('?') { '&' } else { '?' };
    let with = |query: String| format!("{url}{sep}{query}");
    for (query, connects) in [
        ("sslmode=disable".to_owned(), true),
        ("sslmode=prefer".to_owned(), true),
        (format!("sslmode=prefer&sslrootcert={}", ca.display()), true),
        (
            format!("sslmode=require&sslrootcert={}", ca.display()),
            false,
        ),
        (
            format!("sslmode=verify-full&sslrootcert={}", ca.display()),
            false,
        ),
    ] {
        let store =
            keyplane_store::Store::connect(&with(query.clone()), 1, server.store.key().clone())?;
        let result = store.key_check().await;
        assert_eq!(result.is_ok(), connects, "{query}: {result:?}");
        store.close();
    }
    server.stop().await
}
