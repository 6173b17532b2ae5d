//! The upstream resolvers: names outside the zone are asked of them (UDP, TCP when the answer
//! comes back truncated), one fresh socket and random id per question so an off-path sender
//! has to guess both; answers whose id or question do not match are ignored.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::Error;

/// Nameserver addresses of a resolv.conf (`nameserver` lines, port 53), at most `max`.
pub fn parse_resolv_conf(text: &str, max: usize) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            let addr = w.next()?;
            // A scoped IPv6 address (fe80::1%eth0) is not usable from here.
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .take(max)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver is configured")]
    None,
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {server}: malformed answer")]
    Malformed { server: SocketAddr },
}

#[derive(Debug, Clone)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    /// How long to wait for one server.
    pub timeout: Duration,
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Upstream {
        Upstream { servers, timeout }
    }

    /// Reads a resolv.conf (bounded to 64 KiB), leaving out `own` addresses (a node whose
    /// resolv.conf names the node-local DNS address must not forward to itself).
    pub fn from_resolv_conf(
        path: &std::path::Path,
        own: &[IpAddr],
        timeout: Duration,
    ) -> Result<Upstream, Error> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(64 << 10).read_to_string(&mut text))
            .map_err(|source| Error::Io {
                what: format!("reading {}", path.display()),
                source,
            })?;
        let servers = parse_resolv_conf(&text, 8)
            .into_iter()
            .filter(|s| !own.contains(&s.ip()))
            .collect();
        Ok(Upstream::new(servers, timeout))
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks the servers in turn for `name`/`qtype` until one answers.
    pub async fn query(
        &self,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Result<Message, UpstreamError> {
        let mut last = UpstreamError::None;
        for server in &self.servers {
            match self.ask(*server, name, qtype, qclass).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream query failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Result<Message, UpstreamError> {
        let id: u16 = rand::random();
        let mut q = Query::query(name.clone(), qtype);
        q.set_query_class(qclass);
        let mut req = Message::new(id, MessageType::Query, OpCode::Query);
        req.metadata.recursion_desired = true;
        req.add_query(q.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(crate::respond::OUR_UDP_PAYLOAD);
        req.set_edns(edns);
        let bytes = req
            .to_vec()
            .map_err(|_| UpstreamError::Malformed { server })?;
        let io = |source| UpstreamError::Io { server, source };
        let timeout = self.timeout;
        let udp = async {
            let bind: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().map_err(|_| UpstreamError::None)?
            } else {
                "[::]:0".parse().map_err(|_| UpstreamError::None)?
            };
            let sock = UdpSocket::bind(bind).await.map_err(io)?;
            sock.connect(server).await.map_err(io)?;
            sock.send(&bytes).await.map_err(io)?;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = sock.recv(&mut buf).await.map_err(io)?;
                if let Some(m) = matching(&buf[..n], id, &q) {
                    return Ok(m);
                }
            }
        };
        let m: Message = tokio::time::timeout(timeout, udp)
            .await
            .map_err(|_| UpstreamError::Timeout { server, timeout })??;
        if !m.metadata.truncation {
            return Ok(m);
        }
        let tcp = async {
            let mut s = TcpStream::connect(server).await.map_err(io)?;
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            framed.extend_from_slice(&bytes);
            s.write_all(&framed).await.map_err(io)?;
            let len = s.read_u16().await.map_err(io)?;
            let mut buf = vec![0u8; usize::from(len)];
            s.read_exact(&mut buf).await.map_err(io)?;
            matching(&buf, id, &q).ok_or(UpstreamError::Malformed { server })
        };
        tokio::time::timeout(timeout, tcp)
            .await
            .map_err(|_| UpstreamError::Timeout { server, timeout })?
    }
}

/// `buf` decoded if it is the answer to query `id`/`q`.
fn matching(buf: &[u8], id: u16, q: &Query) -> Option<Message> {
    let m = Message::from_vec(buf).ok()?;
    let ok = m.metadata.id == id
        && m.metadata.message_type == MessageType::Response
        && m.queries.len() == 1
        && m.queries[0].query_type() == q.query_type()
        && m.queries[0]
            .name()
            .to_ascii()
            .eq_ignore_ascii_case(&q.name().to_ascii());
    ok.then_some(m)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let t = "# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver  2001:db8::1\nnameserver fe80::1%eth0\noptions ndots:2\nnameserver bogus\n";
        assert_eq!(
            parse_resolv_conf(t, 8),
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(parse_resolv_conf(t, 1).len(), 1);
    }
}
