//! The kernel's answers to a batch (pure): netlink messages split out of a received buffer,
//! errors and acknowledgements read with their sequence numbers, and [`BatchAnswers`]
//! deciding when a batch is answered and which step was refused.

use crate::encode::Batch;
use crate::sys::{NLA_F_NESTED, NLMSG_ERROR};

/// The netlink messages in `buf`: `(type, sequence number, payload)`; a cut message ends the
/// list.
pub fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        out.push((kind, word(at + 8), &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The top-level attributes of a message payload or of a nest: `(type without the nested
/// flag, payload)`; a cut attribute ends the list. For reading back what was encoded (tests)
/// as well as answers.
pub fn attributes(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        out.push((kind, b[4..len].to_vec()));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// The answers the kernel sent: `(sequence number, errno)` of every error and
/// acknowledgement (errno 0) in `buf`.
pub fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    messages(buf)
        .into_iter()
        .filter(|(kind, _, payload)| *kind == NLMSG_ERROR && payload.len() >= 4)
        .map(|(_, seq, p)| (seq, i32::from_ne_bytes([p[0], p[1], p[2], p[3]])))
        .collect()
}

/// A refused batch: the step the kernel named (None: the batch itself) and its errno
/// (negative, as netlink sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub step: Option<usize>,
    pub errno: i32,
}

/// What the kernel has answered so far to one batch. The batch is answered by the
/// acknowledgement of its last step, or by an error (then the first error names the step).
#[derive(Debug, Clone)]
pub struct BatchAnswers {
    first_seq: u32,
    last_seq: u32,
    first_error: Option<(u32, i32)>,
    done: bool,
}

impl BatchAnswers {
    pub fn new(batch: &Batch) -> Self {
        BatchAnswers {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            first_error: None,
            done: false,
        }
    }

    /// Reads one received buffer; answers to other batches are ignored.
    pub fn read(&mut self, buf: &[u8]) {
        let (first, last_op) = (self.first_seq, self.last_seq.wrapping_sub(1));
        for (seq, errno) in parse_acks(buf) {
            if seq.wrapping_sub(first) > self.last_seq.wrapping_sub(first) {
                continue; // an answer to an earlier batch
            }
            if errno != 0 && self.first_error.is_none() {
                self.first_error = Some((seq, errno));
            }
            if seq == last_op || seq == first {
                self.done = true;
            }
        }
    }

    /// Whether the batch's final answer has arrived (more errors may still be queued).
    pub fn done(&self) -> bool {
        self.done
    }

    /// The first error so far.
    pub fn refusal(&self) -> Option<Refusal> {
        self.first_error.map(|(seq, errno)| Refusal {
            step: seq
                .wrapping_sub(self.first_seq)
                .checked_sub(1)
                .map(|i| i as usize),
            errno,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(buf: &mut Vec<u8>, seq: u32, errno: i32) {
        buf.extend_from_slice(&36u32.to_ne_bytes());
        buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf.extend_from_slice(&0u16.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&errno.to_ne_bytes());
        buf.extend_from_slice(&[0; 16]);
    }

    #[test]
    fn attributes_are_read_until_one_is_cut() {
        let mut b = Vec::new();
        for (kind, payload) in [(1u16 | NLA_F_NESTED, &b"abcde"[..]), (2, &b""[..])] {
            b.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(payload);
            b.resize(b.len().next_multiple_of(4), 0);
        }
        let whole = vec![(1, b"abcde".to_vec()), (2, Vec::new())];
        assert_eq!(attributes(&b), whole);
        // An attribute longer than what is left, or shorter than its header, ends the list.
        b.extend_from_slice(&[200, 0, 3, 0, 1, 2]);
        assert_eq!(attributes(&b), whole);
        b.truncate(b.len() - 6);
        b.extend_from_slice(&[2, 0, 3, 0]);
        assert_eq!(attributes(&b), whole);
    }

    #[test]
    fn acks_are_read_with_their_sequence_numbers() {
        let mut buf = Vec::new();
        for (seq, errno) in [(7u32, 0i32), (9, -2)] {
            ack(&mut buf, seq, errno);
        }
        assert_eq!(parse_acks(&buf), vec![(7, 0), (9, -2)]);
        assert_eq!(parse_acks(&buf[..20]), vec![], "a cut message is ignored");
    }

    #[test]
    fn a_batch_is_answered_by_its_last_ack_or_named_by_its_first_error() {
        // Steps 11, 12, 13 between begin 10 and end 14.
        let batch = Batch {
            bytes: Vec::new(),
            first_seq: 10,
            last_seq: 14,
        };
        let mut a = BatchAnswers::new(&batch);
        let mut buf = Vec::new();
        ack(&mut buf, 3, -2); // an earlier batch's
        a.read(&buf);
        assert!(!a.done() && a.refusal().is_none());
        let mut buf = Vec::new();
        ack(&mut buf, 13, 0);
        a.read(&buf);
        assert!(a.done() && a.refusal().is_none());

        let mut a = BatchAnswers::new(&batch);
        let mut buf = Vec::new();
        ack(&mut buf, 12, -2);
        ack(&mut buf, 13, -22);
        a.read(&buf);
        assert!(a.done());
        assert_eq!(
            a.refusal(),
            Some(Refusal {
                step: Some(1),
                errno: -2
            })
        );
    }
}
