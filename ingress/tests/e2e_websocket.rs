//! WebSocket through flannel-ingress end to end: pods on two nodes speak RFC 6455
//! (tungstenite on an upgraded hyper connection); from the hub, WebSocket clients (tungstenite)
//! reach them through the ingress by `Host` (ws://) and by SNI over TLS (wss://, the test CA),
//! exchanging text, a large binary message and ping/pong both ways. The Ingress is then
//! changed to the other pod while both connections are open: new connections go to the new
//! pod within a second, the open ones keep talking to theirs (no reload closes a connection),
//! then close cleanly. WebSocket over HTTP/2 (RFC 8441 extended CONNECT) is not offered: the
//! SETTINGS say so, a `:protocol` request is refused with a stream reset and a plain CONNECT
//! with 400. Needs root, curl and openssl; skips with a reason without them, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async, WebSocketStream};

mod common;

use common::{field, make_certs, path, service, tls_secret, Bed, INGRESS_CLASS, LIMIT, PORT};

fn ingress(to: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: ws, namespace: default}}\nspec:\n  ingressClassName: flannel\n  tls:\n  - {{hosts: [ws.test], secretName: cert-ws}}\n  rules:\n  - host: ws.test\n    http:\n      paths:\n{}---\n",
        path("/", "Prefix", to)
    )
}

/// A TLS client for `ws.test` trusting the test CA, offering `alpn`.
fn tls_connector(bed: &Bed, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bed.dir.path().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Result<Message, String> {
    match tokio::time::timeout(LIMIT, ws.next()).await {
        Ok(Some(Ok(m))) => Ok(m),
        Ok(Some(Err(e))) => Err(format!("websocket error: {e}")),
        Ok(None) => Err("websocket closed".into()),
        Err(_) => Err("no message in time".into()),
    }
}

/// Opens a WebSocket to `url` over `io`; returns it and the pod's greeting (`hello from <id>`).
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    url: &str,
) -> Result<(WebSocketStream<S>, String), String> {
    let (mut ws, resp) = tokio::time::timeout(LIMIT, client_async(url, io))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("status {}", resp.status()));
    }
    match recv(&mut ws).await? {
        Message::Text(t) => Ok((ws, t.as_str().to_string())),
        m => Err(format!("greeting {m:?}")),
    }
}

/// Messages both ways: texts answered by `<id>:<text>`, a 200 KB binary echoed, a ping
/// answered by its pong.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    id: &str,
    tag: &str,
) -> Result<(), String> {
    for i in 0..5 {
        let text = format!("{tag}-{i}");
        ws.send(Message::text(text.clone()))
            .await
            .map_err(|e| e.to_string())?;
        match recv(ws).await? {
            Message::Text(t) if t.as_str() == format!("{id}:{text}") => {}
            m => return Err(format!("{text}: answered {m:?}")),
        }
    }
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone()))
        .await
        .map_err(|e| e.to_string())?;
    match recv(ws).await? {
        Message::Binary(b) if b[..] == big[..] => {}
        m => return Err(format!("binary echo: {} bytes back", m.len())),
    }
    ws.send(Message::Ping(tag.as_bytes().to_vec().into()))
        .await
        .map_err(|e| e.to_string())?;
    match recv(ws).await? {
        Message::Pong(p) if p[..] == *tag.as_bytes() => Ok(()),
        m => Err(format!("ping answered {m:?}")),
    }
}

/// A close handshake: our Close, the peer's Close back, then the end of the stream.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Result<(), String> {
    ws.close(None).await.map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(LIMIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("closing: {e}")),
            Err(_) => return Err("no close in time".into()),
        }
    }
}

#[test]
fn websocket_through_the_ingress_survives_a_change() {
    let Some(mut bed) = Bed::new(3) else {
        return;
    };
    let mut ips = Vec::new();
    for (node, id) in [(1, "ws-a"), (2, "ws-b")] {
        let (ns, ip) = bed.add_pod(node, 0);
        bed.serve(&ns, SocketAddr::from(([0, 0, 0, 0], PORT)), id);
        ips.push(ip);
    }
    bed.route_pods(None);
    let dir = bed.dir.path().to_path_buf();
    make_certs(&dir, &[("cert-ws", "ws.test")]);
    let mut objects = String::from(INGRESS_CLASS);
    objects += &service("svc-ws-a", "http", &ips[..1]);
    objects += &service("svc-ws-b", "http", &ips[1..]);
    objects += &tls_secret(&dir, "cert-ws");
    objects += &ingress("svc-ws-a");
    bed.apply(&objects);
    let started = bed.start_ingress(
        0,
        &["--http-addr", "0.0.0.0:80", "--https-addr", "0.0.0.0:443"],
    );
    let log = || started.log();
    let ip = bed.tb.nodes[0].ip.clone();
    let plain: SocketAddr = format!("{ip}:80").parse().unwrap();
    let secure: SocketAddr = format!("{ip}:443").parse().unwrap();
    test_support::wait_for(Duration::from_secs(5), || {
        (field(&bed.get_at(&ip, "ws.test", "/").1, "pod") == "ws-a").then_some(())
    })
    .unwrap_or_else(|| panic!("no route came up:\n{}", log()));

    let rt = &bed.rt;
    let result: Result<(), String> = rt.block_on(async {
        // ws:// routed by Host, wss:// by SNI (HTTP/1.1 by ALPN, as browsers do for WebSocket).
        let (mut ws, hello) = open(bed.connect_from_hub(plain), "ws://ws.test/chat").await?;
        assert_eq!(hello, "hello from ws-a");
        exchange(&mut ws, "ws-a", "plain").await?;
        let tls = tls_connector(&bed, &[b"http/1.1"])
            .connect(
                ServerName::try_from("ws.test").unwrap(),
                bed.connect_from_hub(secure),
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut wss, hello) = open(tls, "wss://ws.test/chat").await?;
        assert_eq!(hello, "hello from ws-a");
        exchange(&mut wss, "ws-a", "tls").await?;

        // The Ingress moves to ws-b while both are open.
        let changed = Instant::now();
        bed.apply(&ingress("svc-ws-b"));
        let mut live = None;
        while changed.elapsed() < Duration::from_secs(3) {
            let (mut probe, hello) = open(bed.connect_from_hub(plain), "ws://ws.test/chat").await?;
            close(&mut probe).await?;
            if hello == "hello from ws-b" {
                live = Some(changed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = live.ok_or("new WebSocket connections never reached ws-b")?;
        println!("Ingress change live for new WebSockets after {took:?}");
        assert!(took < Duration::from_secs(1), "the change took {took:?}");
        // The open connections still talk to ws-a, both ways.
        exchange(&mut ws, "ws-a", "plain-after").await?;
        exchange(&mut wss, "ws-a", "tls-after").await?;
        close(&mut ws).await?;
        close(&mut wss).await?;

        // HTTP/2: extended CONNECT (RFC 8441) is not offered, and refused when tried.
        let tls = tls_connector(&bed, &[b"h2"])
            .connect(
                ServerName::try_from("ws.test").unwrap(),
                bed.connect_from_hub(secure),
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (client, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
        // One exchange first: the server's SETTINGS are in by its answer.
        let req = http::Request::get("https://ws.test/").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(LIMIT, resp)
            .await
            .map_err(|_| "h2 GET timed out")?
            .map_err(|e| e.to_string())?;
        assert_eq!(resp.status(), 200);
        assert!(
            !client.is_extended_connect_protocol_enabled(),
            "SETTINGS_ENABLE_CONNECT_PROTOCOL advertised"
        );
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
        let mut req = http::Request::connect("https://ws.test/chat")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        let (resp, _) = client.send_request(req, false).map_err(|e| e.to_string())?;
        match tokio::time::timeout(LIMIT, resp).await {
            Ok(Err(e)) if e.reason() == Some(h2::Reason::PROTOCOL_ERROR) => {}
            Ok(other) => return Err(format!("extended CONNECT answered {other:?}")),
            Err(_) => return Err("extended CONNECT: no answer".into()),
        }
        // A plain CONNECT (a tunnel, no path) is not proxied: 400.
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
        let req = http::Request::connect("ws.test:443").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(LIMIT, resp)
            .await
            .map_err(|_| "h2 CONNECT timed out")?
            .map_err(|e| format!("h2 CONNECT: {e}"))?;
        assert_eq!(resp.status(), 400, "plain CONNECT over HTTP/2");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", log());
    }
    let text = log();
    assert!(
        text.contains("host=ws.test target=/chat status=101"),
        "no upgrade in the access log:\n{text}"
    );
    bed.finish(started);
}
