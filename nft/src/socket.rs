//! [`NfNetlink`]: a netfilter netlink socket that sends one encoded batch and waits for the
//! kernel's verdict, and probes a chain with one GETCHAIN (no dump). The socket calls go
//! through nix; nothing here needs `unsafe`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;

use crate::ack::{messages, parse_acks, BatchAnswers};
use crate::encode::{self, Batch, BatchError};
use crate::sys::{NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWCHAIN};
use crate::Error;

/// How long to wait for the kernel's answer to one batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A netfilter netlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct NfNetlink {
    fd: OwnedFd,
    seq: Mutex<u32>,
}

impl NfNetlink {
    /// Opens the socket (in the calling thread's network namespace; it stays there).
    pub fn open() -> Result<NfNetlink, Error> {
        let err = |what: &'static str| move |source: nix::Error| Error::Open { what, source };
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(err("socket(NETLINK_NETFILTER)"))?;
        socket::bind(fd.as_raw_fd(), &socket::NetlinkAddr::new(0, 0)).map_err(err("bind"))?;
        let timeout = TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(err("SO_RCVTIMEO"))?;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(NfNetlink {
            fd,
            seq: Mutex::new(start),
        })
    }

    /// Reserves the sequence numbers of a batch of `steps` steps (begin, steps, end);
    /// returns the first, to encode the batch with.
    pub fn reserve(&self, steps: u32) -> u32 {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let first = *seq;
        *seq = seq.wrapping_add(steps + 2);
        first
    }

    /// Sends `batch` and waits for the kernel's verdict. On failure nothing was changed; the
    /// error names the first refused step by `step_name(index)` ("the batch" when the
    /// kernel refused the batch itself or the name is unknown).
    pub fn send(
        &self,
        batch: &Batch,
        step_name: impl Fn(usize) -> Option<String>,
    ) -> Result<(), Error> {
        let io = |what: &'static str| move |source: nix::Error| Error::Io { what, source };
        if batch.bytes.len() > 200_000 {
            // Like nft: let the socket take the whole batch in one message.
            let size = batch.bytes.len() * 2;
            socket::setsockopt(&self.fd, sockopt::SndBufForce, &size)
                .map_err(io("SO_SNDBUFFORCE"))?;
        }
        let sent = socket::send(self.fd.as_raw_fd(), &batch.bytes, MsgFlags::empty())
            .map_err(io("send"))?;
        if sent != batch.bytes.len() {
            return Err(Error::ShortSend {
                sent,
                len: batch.bytes.len(),
            });
        }
        let mut buf = vec![0u8; 65536];
        let mut answers = BatchAnswers::new(batch);
        loop {
            // Errors and the final acknowledgement are queued before `send` returns (the
            // kernel handles the batch in the sender's context); once an error is known,
            // drain without waiting.
            let flags = if answers.refusal().is_some() {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf, flags) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) if answers.refusal().is_some() => break,
                Err(nix::Error::EAGAIN) => return Err(Error::NoAnswer(ANSWER_TIMEOUT)),
                Err(e) => return Err(io("recv")(e)),
            };
            answers.read(&buf[..n]);
            if answers.done() {
                if answers.refusal().is_none() {
                    return Ok(());
                }
                break;
            }
        }
        let Some(refusal) = answers.refusal() else {
            return Ok(());
        };
        let step = refusal
            .step
            .and_then(step_name)
            .unwrap_or_else(|| "the batch".to_string());
        Err(Error::Kernel {
            step,
            errno: nix::Error::from_raw(-refusal.errno),
        })
    }

    /// Whether chain `name` of table `ip TABLE` exists (one GETCHAIN, no dump).
    pub fn chain_exists(&self, table: &str, name: &str) -> Result<bool, Error> {
        let seq = self.reserve(0);
        let bytes = encode::get_chain(table, name, seq)
            .finish()
            .map_err(|source| BatchError {
                what: format!("get chain {name}"),
                source,
            })?;
        let io = |what: &'static str| move |source: nix::Error| Error::Io { what, source };
        socket::send(self.fd.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(io("send"))?;
        let mut buf = vec![0u8; 65536];
        let mut found = false;
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(io("recv"))?;
            // A NEWCHAIN message (the chain), then the acknowledgement; or an error.
            found |= messages(&buf[..n])
                .iter()
                .any(|(kind, _, _)| *kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN);
            for (s, errno) in parse_acks(&buf[..n]) {
                if s != seq {
                    continue;
                }
                return match errno {
                    0 => Ok(found),
                    e if -e == nix::libc::ENOENT => Ok(false),
                    e => Err(Error::Kernel {
                        step: format!("netlink get chain {name}"),
                        errno: nix::Error::from_raw(-e),
                    }),
                };
            }
        }
    }
}
