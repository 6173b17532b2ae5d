//! The access line, one per request, formatted straight into the log writer's buffer
//! ([`crate::logwriter::NonBlocking::append_with`]) rather than through tracing's generic field
//! formatting. The line is the one tracing's `fmt` layer wrote for the former `tracing::info!`
//! event (target `access`, no colours):
//!
//! ```text
//! 2026-12-07T03:49:26.123456Z  INFO access: client=10.0.0.1 proto="http" version=HTTP/1.1 method=GET host=a.test target=/api?x=1 status=200 backend=default/svc:80 upstream=10.5.1.2:8080 ms=0.42
//! ```
//!
//! Values taken from the request (host, target, method) and the backend's names are written
//! as they are when they consist of visible ASCII other than `"` and `\`; any other byte
//! (space, quote, backslash, control characters, non-ASCII) is written as `\xHH`, so a line is
//! always one line of `key=value` pairs separated by single spaces. `backend` and `upstream`
//! are empty when the request was not routed or no endpoint was tried.

use std::cell::Cell;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use http::{Method, Version};

use crate::routes::{BackendRef, PortRef};

/// What one access line says.
#[derive(Debug, Clone)]
pub struct AccessLine<'a> {
    /// When the line is written.
    pub time: SystemTime,
    pub client: IpAddr,
    pub tls: bool,
    pub version: Version,
    pub method: &'a Method,
    /// The request's host, as the client sent it.
    pub host: &'a [u8],
    /// The path and query, as the client sent them.
    pub target: &'a str,
    pub status: u16,
    pub backend: Option<&'a BackendRef>,
    pub upstream: Option<SocketAddr>,
    pub elapsed: Duration,
}

impl AccessLine<'_> {
    /// Appends the line, newline included, to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        write_time(out, self.time);
        out.extend_from_slice(b"  INFO access: client=");
        write_ip(out, self.client);
        // Quoted: tracing wrote a `&str` field with `Debug`.
        out.extend_from_slice(if self.tls {
            b" proto=\"https\" version="
        } else {
            b" proto=\"http\" version="
        });
        out.extend_from_slice(version_str(self.version).as_bytes());
        out.extend_from_slice(b" method=");
        write_escaped(out, self.method.as_str().as_bytes());
        out.extend_from_slice(b" host=");
        write_escaped(out, self.host);
        out.extend_from_slice(b" target=");
        write_escaped(out, self.target.as_bytes());
        out.extend_from_slice(b" status=");
        write_uint(out, u64::from(self.status));
        out.extend_from_slice(b" backend=");
        if let Some(b) = self.backend {
            write_escaped(out, b.namespace.as_bytes());
            out.push(b'/');
            write_escaped(out, b.service.as_bytes());
            out.push(b':');
            match &b.port {
                PortRef::Number(n) => write_uint(out, u64::from(*n)),
                PortRef::Name(n) => write_escaped(out, n.as_bytes()),
            }
        }
        out.extend_from_slice(b" upstream=");
        match self.upstream {
            Some(SocketAddr::V4(a)) => {
                write_ip(out, IpAddr::V4(*a.ip()));
                out.push(b':');
                write_uint(out, u64::from(a.port()));
            }
            // `[addr]:port` (with a scope id when there is one): std's form.
            Some(a @ SocketAddr::V6(_)) => {
                let _ = write!(out, "{a}");
            }
            None => {}
        }
        out.extend_from_slice(b" ms=");
        write_ms(out, self.elapsed);
        out.push(b'\n');
    }
}

/// As `Debug` writes an HTTP version.
fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// Visible ASCII other than `"` and `\` as it is, every other byte as `\xHH`.
pub fn write_escaped(out: &mut Vec<u8>, value: &[u8]) {
    let plain = |c: u8| (0x21..=0x7e).contains(&c) && c != b'"' && c != b'\\';
    if value.iter().all(|&c| plain(c)) {
        out.extend_from_slice(value);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &c in value {
        if plain(c) {
            out.push(c);
        } else {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 0xf)],
            ]);
        }
    }
}

/// `n` in decimal (the access line, and the lengths in heads: h1.rs, upstream.rs).
pub(crate) fn write_uint(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` in at least `width` digits, zeros in front.
fn write_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut b = itoa::Buffer::new();
    let digits = b.format(n).as_bytes();
    out.resize(out.len() + width.saturating_sub(digits.len()), b'0');
    out.extend_from_slice(digits);
}

/// An address as `Display` writes it (IPv4 by hand, without `core::fmt`).
pub(crate) fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_uint(out, u64::from(o));
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// Milliseconds with two decimals (rounded to the nearest hundredth).
fn write_ms(out: &mut Vec<u8>, d: Duration) {
    let hundredths = (d.as_nanos() + 5_000) / 10_000;
    write_uint(out, u64::try_from(hundredths / 100).unwrap_or(u64::MAX));
    out.push(b'.');
    write_padded(out, (hundredths % 100) as u64, 2);
}

/// The date (year, month, day) of a day counted from 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 in UTC with microseconds, as tracing's `fmt` writes it (a clock before 1970 is
/// written as 1970). The text up to the second is kept per thread and rebuilt once a second.
fn write_time(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        /// The second last written and its `YYYY-MM-DDTHH:MM:SS.`.
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (kept, text) = SECOND.get();
    if kept == secs {
        out.extend_from_slice(&text);
    } else {
        let start = out.len();
        write_second(out, secs);
        // Not kept for a year of five digits (the text is then longer).
        if let Ok(text) = <[u8; 20]>::try_from(&out[start..]) {
            SECOND.set((secs, text));
        }
    }
    write_padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` of `secs` since 1970.
fn write_second(out: &mut Vec<u8>, secs: u64) {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let (year, month, day) = civil_from_days(days);
    let rem = secs % 86_400;
    write_padded(out, u64::try_from(year).unwrap_or(0), 4);
    out.push(b'-');
    write_padded(out, u64::from(month), 2);
    out.push(b'-');
    write_padded(out, u64::from(day), 2);
    out.push(b'T');
    write_padded(out, rem / 3_600, 2);
    out.push(b':');
    write_padded(out, rem / 60 % 60, 2);
    out.push(b':');
    write_padded(out, rem % 60, 2);
    out.push(b'.');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn backend() -> BackendRef {
        BackendRef {
            namespace: "default".into(),
            service: "svc-a".into(),
            port: PortRef::Number(80),
        }
    }

    fn line(l: &AccessLine<'_>) -> String {
        let mut out = Vec::new();
        l.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn sample<'a>(method: &'a Method, backend: Option<&'a BackendRef>) -> AccessLine<'a> {
        AccessLine {
            time: SystemTime::UNIX_EPOCH + Duration::new(1_796_615_366, 123_456_789),
            client: "10.0.0.7".parse().unwrap(),
            tls: false,
            version: Version::HTTP_11,
            method,
            host: b"a.example.test",
            target: "/api/load?x=1",
            status: 200,
            backend,
            upstream: Some("10.5.1.2:8080".parse().unwrap()),
            elapsed: Duration::from_micros(1_234),
        }
    }

    #[test]
    fn the_line_as_documented() {
        let b = backend();
        let m = Method::GET;
        assert_eq!(
            line(&sample(&m, Some(&b))),
            "2026-12-07T03:49:26.123456Z  INFO access: client=10.0.0.7 proto=\"http\" \
             version=HTTP/1.1 method=GET host=a.example.test target=/api/load?x=1 status=200 \
             backend=default/svc-a:80 upstream=10.5.1.2:8080 ms=1.23\n"
        );
        let mut l = sample(&m, None);
        l.upstream = None;
        l.tls = true;
        l.version = Version::HTTP_2;
        l.client = "fd00::1".parse().unwrap();
        l.status = 404;
        l.elapsed = Duration::from_nanos(4_995_000);
        assert!(
            line(&l).ends_with(
                "client=fd00::1 proto=\"https\" version=HTTP/2.0 method=GET host=a.example.test \
                 target=/api/load?x=1 status=404 backend= upstream= ms=5.00\n"
            ),
            "{}",
            line(&l)
        );
        l.upstream = Some("[fd00::2]:8080".parse().unwrap());
        assert!(
            line(&l).contains(" upstream=[fd00::2]:8080 "),
            "{}",
            line(&l)
        );
    }

    #[test]
    fn request_values_are_escaped() {
        let b = BackendRef {
            namespace: "ns".into(),
            service: "svc".into(),
            port: PortRef::Name("h\"ttp".into()),
        };
        let m = Method::from_bytes(b"PURGE").unwrap();
        let mut l = sample(&m, Some(&b));
        l.host = b"a b\"c\\d\te\x1b[31m\n\xc3\xa9";
        l.target = "/p\"q\x7f";
        let s = line(&l);
        assert!(
            s.contains(
                " method=PURGE host=a\\x20b\\x22c\\x5cd\\x09e\\x1b[31m\\x0a\\xc3\\xa9 \
                 target=/p\\x22q\\x7f status=200 backend=ns/svc:h\\x22ttp "
            ),
            "{s}"
        );
        // One line, only visible ASCII and the separating spaces.
        assert_eq!(s.matches('\n').count(), 1);
        assert!(s.trim_end().bytes().all(|c| (0x20..0x7f).contains(&c)));
        let mut out = Vec::new();
        write_escaped(&mut out, b"");
        assert!(out.is_empty());
    }

    #[test]
    fn dates_and_durations() {
        let at = |secs: u64| {
            let mut out = Vec::new();
            write_time(&mut out, SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000000Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00.000000Z");
        assert_eq!(at(1_798_761_599), "2026-12-31T23:59:59.000000Z");
        // The text up to the second is kept per thread: the same second again, the next one,
        // an earlier one, and a year of five digits (not kept).
        let at_us = |secs: u64, micros: u32| {
            let mut out = Vec::new();
            write_time(
                &mut out,
                SystemTime::UNIX_EPOCH + Duration::new(secs, micros * 1_000),
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at_us(1_798_761_599, 5), "2026-12-31T23:59:59.000005Z");
        assert_eq!(at_us(1_798_761_599, 999_999), "2026-12-31T23:59:59.999999Z");
        assert_eq!(at_us(1_798_761_600, 10), "2027-01-01T00:00:00.000010Z");
        assert_eq!(at_us(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at_us(253_402_300_800, 1), "10000-01-01T00:00:00.000001Z");
        assert_eq!(at_us(253_402_300_800, 2), "10000-01-01T00:00:00.000002Z");
        assert_eq!(at_us(1_798_761_600, 11), "2027-01-01T00:00:00.000011Z");
        let ms = |d: Duration| {
            let mut out = Vec::new();
            write_ms(&mut out, d);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(ms(Duration::ZERO), "0.00");
        assert_eq!(ms(Duration::from_micros(70)), "0.07");
        assert_eq!(ms(Duration::from_micros(994)), "0.99");
        assert_eq!(ms(Duration::from_micros(996)), "1.00");
        assert_eq!(ms(Duration::from_millis(60_000)), "60000.00");
    }

    /// A writer the test can read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line is the one tracing's `fmt` wrote for the event it replaces (all but the time).
    #[test]
    fn same_line_as_the_tracing_event() {
        let captured = Captured::default();
        let w = captured.clone();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || w.clone())
                .finish(),
        );
        let b = backend();
        let m = Method::POST;
        let mut cases = vec![sample(&m, Some(&b))];
        let mut l = sample(&m, None);
        l.upstream = None;
        l.tls = true;
        l.version = Version::HTTP_2;
        l.client = "fd00::1".parse().unwrap();
        cases.push(l);
        for l in &cases {
            captured.0.lock().unwrap().clear();
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::info!(
                    target: "access",
                    client = %l.client,
                    proto = if l.tls { "https" } else { "http" },
                    version = ?l.version,
                    method = %l.method,
                    host = %std::str::from_utf8(l.host).unwrap(),
                    target = %l.target,
                    status = l.status,
                    backend = %l.backend.map(ToString::to_string).unwrap_or_default(),
                    upstream = %l.upstream.map(|a| a.to_string()).unwrap_or_default(),
                    ms = format_args!("{:.2}", l.elapsed.as_secs_f64() * 1e3),
                );
            });
            let theirs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            let ours = line(l);
            // The time differs; everything from the level on is the same.
            let cut = |s: &str| s.split_once("Z ").unwrap().1.to_string();
            assert_eq!(cut(&ours), cut(&theirs));
            assert_eq!(ours.find("Z "), theirs.find("Z "));
        }
    }
}
