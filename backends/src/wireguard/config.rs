//! The `Backend` options of the wireguard type, as flannel reads them (keys case-insensitive,
//! defaults from flannel's `RegisterNetwork`), and the pre-shared key. Pure.

use std::fmt;

use base64::Engine;
use serde_json::{Map, Value};

use crate::options::{bad, Options};
use crate::BackendError;

/// flannel's `ListenPort` default.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// flannel's `ListenPortV6` default.
pub const DEFAULT_LISTEN_PORT_V6: u16 = 51821;
/// What WireGuard adds to an inner packet, as flannel counts it: outer IPv4 (20) or IPv6 (40)
/// header, UDP 8, type 4, receiver index 4, counter 8, tag 16 (flannel uses 80 for both).
pub const OVERHEAD: u32 = 80;
/// The smallest `MTU` accepted: an IPv4 packet of 68 bytes must fit inside.
const MIN_MTU: u64 = 68 + OVERHEAD as u64;

/// flannel's `Mode`: which underlay a peer is reached over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One device per family (flannel's default).
    Separate,
    /// One device; per peer IPv4 or IPv6, whichever is likelier to connect.
    Auto,
    /// One device, every peer over IPv4.
    Ipv4,
    /// One device, every peer over IPv6.
    Ipv6,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Separate => "separate",
            Mode::Auto => "auto",
            Mode::Ipv4 => "ipv4",
            Mode::Ipv6 => "ipv6",
        }
    }
}

/// A pre-shared key: 32 bytes. Its `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk(pub [u8; 32]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// Decodes a WireGuard key (base64 of 32 bytes; surrounding whitespace ignored).
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// Encodes a WireGuard key as base64 (what `wg` and flannel print and store).
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// `Backend` options of the wireguard type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConfig {
    pub listen_port: u16,
    pub listen_port_v6: u16,
    pub psk: Option<Psk>,
    /// `PersistentKeepaliveInterval` in seconds (flannel multiplies the number by one second);
    /// None = off.
    pub keepalive: Option<u16>,
    pub mode: Mode,
    /// `MTU`: the underlay MTU the device's is derived from; None = the external interface's.
    pub mtu: Option<u32>,
}

const KEYS: &[&str] = &[
    "ListenPort",
    "ListenPortV6",
    "PSK",
    "PersistentKeepaliveInterval",
    "Mode",
    "MTU",
];

impl WgConfig {
    /// Parses the options; errors name `Backend.<key>` and never echo the PSK. Returns the
    /// config and warnings for unknown keys.
    pub fn parse(options: &Map<String, Value>) -> Result<(Self, Vec<String>), BackendError> {
        let o = Options::new(options, "wireguard");
        let port = |key: &str, default: u16| -> Result<u16, BackendError> {
            Ok(match o.uint(key, 65535)? {
                None | Some(0) => default,
                Some(p) => p as u16,
            })
        };
        let listen_port = port("ListenPort", DEFAULT_LISTEN_PORT)?;
        let listen_port_v6 = port("ListenPortV6", DEFAULT_LISTEN_PORT_V6)?;
        let psk = match o.raw("PSK") {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(Psk(decode_key(s).ok_or_else(|| {
                bad(
                    "PSK",
                    "must be a WireGuard key: base64 of 32 bytes (e.g. from `wg genpsk`); value not shown",
                )
            })?)),
            Some(_) => {
                return Err(bad(
                    "PSK",
                    "must be a string (base64 of 32 bytes); value not shown",
                ))
            }
        };
        let keepalive = match o.uint("PersistentKeepaliveInterval", 65535)? {
            None | Some(0) => None,
            Some(s) => Some(s as u16),
        };
        let mode = match o.choice("Mode", &["separate", "auto", "ipv4", "ipv6"])? {
            None | Some("separate") => Mode::Separate,
            Some("auto") => Mode::Auto,
            Some("ipv4") => Mode::Ipv4,
            Some(_) => Mode::Ipv6,
        };
        if mode == Mode::Ipv6 {
            return Err(bad(
                "Mode",
                "\"ipv6\" (every peer over an IPv6 underlay) is not supported by this build's wireguard backend yet; use \"separate\", \"auto\" or \"ipv4\"",
            ));
        }
        let mtu = match o.uint("MTU", 65535)? {
            None | Some(0) => None,
            Some(m) if m < MIN_MTU => {
                return Err(bad(
                    "MTU",
                    format!(
                        "must be at least {MIN_MTU} (the device gets MTU - {OVERHEAD}), got {m}"
                    ),
                ))
            }
            Some(m) => Some(m as u32),
        };
        Ok((
            WgConfig {
                listen_port,
                listen_port_v6,
                psk,
                keepalive,
                mode,
                mtu,
            },
            o.warnings(KEYS),
        ))
    }

    /// The device MTU and `FLANNEL_MTU`: `MTU` (default: the interface's) minus [`OVERHEAD`].
    pub fn device_mtu(&self, iface_mtu: u32) -> u32 {
        self.mtu.unwrap_or(iface_mtu).saturating_sub(OVERHEAD)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn o(j: &str) -> Map<String, Value> {
        serde_json::from_str(j).unwrap()
    }

    fn err(j: &str) -> String {
        WgConfig::parse(&o(j)).unwrap_err().to_string()
    }

    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    #[test]
    fn defaults_are_flannels() {
        let (c, w) = WgConfig::parse(&o("{}")).unwrap();
        assert_eq!(
            c,
            WgConfig {
                listen_port: 51820,
                listen_port_v6: 51821,
                psk: None,
                keepalive: None,
                mode: Mode::Separate,
                mtu: None,
            }
        );
        assert!(w.is_empty());
        assert_eq!(c.device_mtu(1500), 1420);
    }

    #[test]
    fn every_option_is_read_case_insensitively() {
        let (c, w) = WgConfig::parse(&o(&format!(
            r#"{{"listenport":51000,"ListenPortV6":51001,"psk":"{PSK}","PersistentKeepaliveInterval":25,"Mode":"Auto","MTU":9000,"Extra":1}}"#
        )))
        .unwrap();
        assert_eq!(c.listen_port, 51000);
        assert_eq!(c.listen_port_v6, 51001);
        assert_eq!(c.psk, Some(Psk(decode_key(PSK).unwrap())));
        assert_eq!(c.keepalive, Some(25));
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.device_mtu(1500), 8920);
        assert_eq!(w, vec!["Backend.Extra: unknown wireguard option ignored"]);
        // Zero and null mean "the default", as flannel's zero values do.
        let (c, _) = WgConfig::parse(&o(
            r#"{"ListenPort":0,"PSK":"","PersistentKeepaliveInterval":0,"MTU":null,"Mode":"ipv4"}"#,
        ))
        .unwrap();
        assert_eq!(
            (c.listen_port, c.psk, c.keepalive, c.mtu, c.mode),
            (51820, None, None, None, Mode::Ipv4)
        );
    }

    #[test]
    fn bad_values_name_the_field_and_never_echo_the_psk() {
        assert!(err(r#"{"ListenPort":70000}"#).starts_with("Backend.ListenPort:"));
        assert!(err(r#"{"ListenPortV6":"x"}"#).starts_with("Backend.ListenPortV6:"));
        assert!(err(r#"{"PersistentKeepaliveInterval":-1}"#)
            .starts_with("Backend.PersistentKeepaliveInterval:"));
        assert!(err(r#"{"Mode":"both"}"#).starts_with("Backend.Mode:"));
        let e = err(r#"{"Mode":"ipv6"}"#);
        assert!(
            e.starts_with("Backend.Mode:") && e.contains("not supported"),
            "{e}"
        );
        assert!(err(r#"{"MTU":100}"#).starts_with("Backend.MTU:"));
        let secretish = "c2VjcmV0LXRvby1zaG9ydA==";
        let e = err(&format!(r#"{{"PSK":"{secretish}"}}"#));
        assert!(
            e.starts_with("Backend.PSK:") && !e.contains(secretish),
            "{e}"
        );
        let e = err(r#"{"PSK":12345}"#);
        assert!(e.starts_with("Backend.PSK:") && !e.contains("12345"), "{e}");
        let (c, _) = WgConfig::parse(&o(&format!(r#"{{"PSK":"{PSK}"}}"#))).unwrap();
        assert!(!format!("{c:?}").contains(PSK));
    }

    #[test]
    fn keys_round_trip() {
        let k = decode_key(PSK).unwrap();
        assert_eq!(encode_key(&k), PSK);
        assert_eq!(decode_key(&format!("{PSK}\n")), Some(k));
        assert_eq!(decode_key("AAAA"), None);
        assert_eq!(decode_key("not base64!"), None);
    }
}
