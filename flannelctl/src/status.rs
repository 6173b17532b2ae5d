//! `flannelctl status`: every node that holds a lease, asked over HTTP for `/readyz` and
//! `/metrics` at its public IP (flanneld `--healthz-ip` must let it answer there and
//! `--healthz-port` must match `--health-port`), as one table: node, subnet, backend, peers
//! programmed, network policy (off, on, or on without br_netfilter), ready.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::common::{align, EtcdFlags};
use crate::leases::{fetch, Format};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The port flanneld serves /readyz and /metrics on (its `--healthz-port`).
    #[arg(long, env = "FLANNELCTL_HEALTH_PORT", default_value_t = 8471)]
    health_port: u16,
    /// Seconds to wait for each node.
    #[arg(long, default_value_t = 2)]
    timeout: u64,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// What one node answered.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub subnet: String,
    pub backend: String,
    /// `flannel_peers` from /metrics.
    pub peers: Option<u64>,
    /// NetworkPolicy on the node, from /metrics (None: no answer).
    pub policy: Option<Policy>,
    /// `Ok(())` ready; `Err(reason)` not ready or unreachable.
    pub ready: Result<(), String>,
}

/// One HTTP/1.0 GET; returns (status code, body).
fn get(addr: SocketAddr, path: &str, limit: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(4 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    parse_response(&String::from_utf8_lossy(&buf))
}

/// Status code and body of an HTTP response (pure).
pub fn parse_response(text: &str) -> Result<(u16, String), String> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", head.lines().next()))?;
    Ok((code, body.to_string()))
}

/// The value of an unlabelled sample in Prometheus text (pure).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Whether a node enforces NetworkPolicy, and fully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Off,
    On,
    /// On, but br_netfilter is missing: same-node pod traffic escapes the policies.
    NoBrNetfilter,
}

impl Policy {
    /// From `flannel_policy_enabled` and `flannel_policy_br_netfilter` (pure).
    pub fn from_metrics(text: &str) -> Option<Policy> {
        match (
            metric(text, "flannel_policy_enabled")?,
            metric(text, "flannel_policy_br_netfilter"),
        ) {
            (0, _) => Some(Policy::Off),
            (_, Some(0)) => Some(Policy::NoBrNetfilter),
            _ => Some(Policy::On),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::On => "on",
            Policy::NoBrNetfilter => "no-br-netfilter",
        }
    }
}

/// The table (pure).
pub fn table(nodes: &[NodeStatus]) -> String {
    let mut rows = vec![["NODE", "SUBNET", "BACKEND", "PEERS", "POLICY", "READY"]
        .map(String::from)
        .to_vec()];
    for n in nodes {
        rows.push(vec![
            n.node.clone(),
            n.subnet.clone(),
            n.backend.clone(),
            n.peers.map_or("-".into(), |p| p.to_string()),
            n.policy.map_or("-", Policy::as_str).to_string(),
            match &n.ready {
                Ok(()) => "yes".into(),
                Err(why) => format!("no: {why}"),
            },
        ]);
    }
    align(&rows)
}

fn to_json(nodes: &[NodeStatus]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|n| {
                json!({
                    "node": n.node, "subnet": n.subnet, "backend": n.backend,
                    "peers": n.peers, "policy": n.policy.map(Policy::as_str),
                    "ready": n.ready.is_ok(),
                    "reason": n.ready.as_ref().err(),
                })
            })
            .collect(),
    )
}

pub async fn run(etcd: &EtcdFlags, args: StatusArgs) -> Result<()> {
    let rows = fetch(etcd).await?;
    let limit = Duration::from_secs(args.timeout.max(1));
    // Ask every node at once (a dead node costs one timeout, not one per node).
    let handles: Vec<_> = rows
        .iter()
        .filter(|r| !r.lease.is_reservation())
        .map(|r| {
            let addr = SocketAddr::from((r.lease.attrs.public_ip, args.health_port));
            let (subnet, backend) = (
                crate::leases::subnets(&r.lease.key),
                r.lease.attrs.backend_type.clone(),
            );
            std::thread::spawn(move || {
                let ready = match get(addr, "/readyz", limit) {
                    Ok((200, _)) => Ok(()),
                    Ok((code, body)) => Err(format!("{code} {}", body.trim())),
                    Err(e) => Err(format!("unreachable at {addr}: {e}")),
                };
                let metrics = get(addr, "/metrics", limit).ok().map(|(_, body)| body);
                let peers = metrics.as_deref().and_then(|m| metric(m, "flannel_peers"));
                let policy = metrics.as_deref().and_then(Policy::from_metrics);
                NodeStatus {
                    node: addr.ip().to_string(),
                    subnet,
                    backend,
                    peers,
                    policy,
                    ready,
                }
            })
        })
        .collect();
    let nodes: Vec<NodeStatus> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&to_json(&nodes))?),
        Format::Table => print!("{}", table(&nodes)),
    }
    let down = nodes.iter().filter(|n| n.ready.is_err()).count();
    if down > 0 {
        bail!("{down} of {} nodes not ready", nodes.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_metrics_and_table() {
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nno lease\n"),
            Ok((503, "no lease\n".into()))
        );
        assert!(parse_response("garbage").is_err());
        let m = "# HELP flannel_peers x\nflannel_peers_unreachable 1\nflannel_peers 2\n";
        assert_eq!(metric(m, "flannel_peers"), Some(2));
        assert_eq!(metric(m, "flannel_nothing"), None);
        let t = table(&[
            NodeStatus {
                node: "192.0.2.1".into(),
                subnet: "10.5.1.0/24".into(),
                backend: "vxlan".into(),
                peers: Some(2),
                policy: Some(Policy::On),
                ready: Ok(()),
            },
            NodeStatus {
                node: "192.0.2.2".into(),
                subnet: "10.5.2.0/24".into(),
                backend: "udp".into(),
                peers: None,
                policy: None,
                ready: Err("unreachable at 192.0.2.2:8471: timed out".into()),
            },
            NodeStatus {
                node: "192.0.2.3".into(),
                subnet: "10.5.3.0/24".into(),
                backend: "vxlan".into(),
                peers: Some(2),
                policy: Some(Policy::NoBrNetfilter),
                ready: Err("503 network policy: no br_netfilter".into()),
            },
        ]);
        assert_eq!(
            t,
            "NODE        SUBNET        BACKEND   PEERS   POLICY            READY\n\
             192.0.2.1   10.5.1.0/24   vxlan     2       on                yes\n\
             192.0.2.2   10.5.2.0/24   udp       -       -                 no: unreachable at 192.0.2.2:8471: timed out\n\
             192.0.2.3   10.5.3.0/24   vxlan     2       no-br-netfilter   no: 503 network policy: no br_netfilter\n"
        );
        let m = "flannel_policy_enabled 1\nflannel_policy_br_netfilter 0\n";
        assert_eq!(Policy::from_metrics(m), Some(Policy::NoBrNetfilter));
        let m = "flannel_policy_enabled 1\nflannel_policy_br_netfilter 1\n";
        assert_eq!(Policy::from_metrics(m), Some(Policy::On));
        let m = "flannel_policy_enabled 0\nflannel_policy_br_netfilter 0\n";
        assert_eq!(Policy::from_metrics(m), Some(Policy::Off));
        assert_eq!(Policy::from_metrics("flannel_peers 1\n"), None);
    }
}
