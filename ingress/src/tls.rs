//! TLS certificates: `kubernetes.io/tls` Secrets parsed into rustls `CertifiedKey`s (chain +
//! key, checked to match), the default self-signed certificate made at start, and the SNI
//! resolver that picks one per handshake from the current snapshot.
//!
//! A Secret that cannot serve (wrong type, a key missing, PEM that does not parse, a key that
//! does not match the certificate) leaves its hosts on the default certificate; the problem is
//! reported once per Secret content, and never with the key material.

use std::collections::HashMap;
use std::sync::Arc;

use registry::{Secret, SECRET_TYPE_TLS, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::snapshot::Snapshot;

/// Why a Secret's certificate is not used (the text holds no key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("Secret {0} not found")]
    NotFound(String),
    #[error("Secret {0} is of type {1}, not kubernetes.io/tls")]
    NotTls(String, String),
    #[error("Secret {0} has no {1}")]
    MissingKey(String, &'static str),
    #[error("Secret {0}: tls.crt holds no PEM certificate")]
    NoCertificate(String),
    #[error("Secret {0}: tls.crt does not parse as PEM")]
    BadCertificate(String),
    #[error("Secret {0}: tls.key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    BadKey(String),
    #[error("Secret {0}: the key cannot be used or does not match the certificate: {1}")]
    Unusable(String, String),
    #[error("default certificate: {0}")]
    Default(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain and key of a `kubernetes.io/tls` Secret named `name` (for errors).
pub fn certified_key(name: &str, secret: &Secret) -> Result<Arc<CertifiedKey>, CertError> {
    if secret.secret_type() != SECRET_TYPE_TLS {
        return Err(CertError::NotTls(
            name.to_string(),
            secret.secret_type().to_string(),
        ));
    }
    let crt = secret
        .value(TLS_CERT_KEY)
        .ok_or_else(|| CertError::MissingKey(name.to_string(), TLS_CERT_KEY))?;
    let key = secret
        .value(TLS_PRIVATE_KEY_KEY)
        .ok_or_else(|| CertError::MissingKey(name.to_string(), TLS_PRIVATE_KEY_KEY))?;
    let chain = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::BadCertificate(name.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate(name.to_string()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|_| CertError::BadKey(name.to_string()))?;
    let ck = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| CertError::Unusable(name.to_string(), e.to_string()))?;
    Ok(Arc::new(ck))
}

/// A self-signed certificate for hosts without a usable one (as ingress-nginx's "Kubernetes
/// Ingress Controller Fake Certificate").
pub fn default_certificate() -> Result<Arc<CertifiedKey>, CertError> {
    let mut params = rcgen::CertificateParams::new(vec!["ingress.local".to_string()])
        .map_err(|e| CertError::Default(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "flannel-ingress default certificate",
    );
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Default(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Default(e.to_string()))?;
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| CertError::Default(e.to_string()))?;
    let ck = CertifiedKey::from_der(vec![cert.der().clone()], der, &provider())
        .map_err(|e| CertError::Default(e.to_string()))?;
    Ok(Arc::new(ck))
}

/// Parsed Secrets kept between snapshots: a Secret whose certificate and key did not change is
/// not parsed (nor reported) again.
#[derive(Debug, Default)]
pub struct CertCache {
    entries: HashMap<(String, String), Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The type, tls.crt and tls.key as last parsed (compared, never printed); None: the
    /// Secret was missing.
    material: Option<(String, Vec<u8>, Vec<u8>)>,
    result: Result<Arc<CertifiedKey>, CertError>,
}

impl CertCache {
    /// The certificate of Secret `ns/name`; the bool is true when this result is new (a
    /// failure to report).
    pub fn get(
        &mut self,
        ns: &str,
        name: &str,
        secret: Option<&Secret>,
    ) -> (Result<Arc<CertifiedKey>, CertError>, bool) {
        let key = (ns.to_string(), name.to_string());
        let full = format!("{ns}/{name}");
        // None for a missing Secret; the type is part of what is compared.
        let material = secret.map(|s| {
            (
                s.secret_type().to_string(),
                s.value(TLS_CERT_KEY).unwrap_or_default().to_vec(),
                s.value(TLS_PRIVATE_KEY_KEY).unwrap_or_default().to_vec(),
            )
        });
        if let Some(e) = self.entries.get(&key) {
            if e.material == material {
                return (e.result.clone(), false);
            }
        }
        let result = match secret {
            Some(s) => certified_key(&full, s),
            None => Err(CertError::NotFound(full)),
        };
        self.entries.insert(
            key,
            Entry {
                material,
                result: result.clone(),
            },
        );
        (result, true)
    }

    /// Forgets the Secrets no longer named.
    pub fn retain(&mut self, used: &std::collections::HashSet<(String, String)>) {
        self.entries.retain(|k, _| used.contains(k));
    }
}

/// Picks the certificate for each handshake by its SNI name from the current snapshot.
#[derive(Debug)]
pub struct SniResolver {
    snap: watch::Receiver<Arc<Snapshot>>,
}

impl SniResolver {
    pub fn new(snap: watch::Receiver<Arc<Snapshot>>) -> SniResolver {
        SniResolver { snap }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.snap.borrow().clone();
        Some(snap.certificate(hello.server_name().unwrap_or("")))
    }
}

/// The server's TLS configuration: certificates by SNI, ALPN h2 then http/1.1.
pub fn server_config(resolver: SniResolver) -> Result<rustls::ServerConfig, CertError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Default(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Session resumption (TLS 1.2 session IDs, TLS 1.3 stateful tickets) for as many clients
    // as nginx's `ssl_session_cache shared:SSL:10m` holds about (rustls keeps 256 by default).
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    Ok(cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tls_secret(crt: &[u8], key: &[u8]) -> Secret {
        let mut s = Secret {
            type_: Some(SECRET_TYPE_TLS.into()),
            ..Secret::default()
        };
        s.data
            .insert(TLS_CERT_KEY.into(), registry::SecretBytes(crt.to_vec()));
        s.data.insert(
            TLS_PRIVATE_KEY_KEY.into(),
            registry::SecretBytes(key.to_vec()),
        );
        s
    }

    fn pem_pair(host: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn parses_a_tls_secret_and_refuses_broken_ones() {
        let (crt, key) = pem_pair("a.example.com");
        let ck = certified_key("web/a", &tls_secret(crt.as_bytes(), key.as_bytes())).unwrap();
        assert_eq!(ck.cert.len(), 1);
        let (_, other_key) = pem_pair("b.example.com");
        // A key of another certificate.
        let e =
            certified_key("web/a", &tls_secret(crt.as_bytes(), other_key.as_bytes())).unwrap_err();
        assert!(matches!(e, CertError::Unusable(..)), "{e}");
        // The error never holds the key.
        assert!(!e.to_string().contains("PRIVATE"), "{e}");
        assert!(matches!(
            certified_key("web/a", &tls_secret(b"junk", key.as_bytes())),
            Err(CertError::NoCertificate(_))
        ));
        assert!(matches!(
            certified_key("web/a", &tls_secret(crt.as_bytes(), b"junk")),
            Err(CertError::BadKey(_))
        ));
        let mut opaque = tls_secret(crt.as_bytes(), key.as_bytes());
        opaque.type_ = None;
        assert!(matches!(
            certified_key("web/a", &opaque),
            Err(CertError::NotTls(..))
        ));
        let mut missing = tls_secret(crt.as_bytes(), key.as_bytes());
        missing.data.remove(TLS_PRIVATE_KEY_KEY);
        assert!(matches!(
            certified_key("web/a", &missing),
            Err(CertError::MissingKey(..))
        ));
    }

    #[test]
    fn cache_reports_each_content_once() {
        let (crt, key) = pem_pair("a.example.com");
        let bad = tls_secret(crt.as_bytes(), b"junk");
        let mut c = CertCache::default();
        let (r, fresh) = c.get("web", "a", Some(&bad));
        assert!(r.is_err() && fresh);
        let (r, fresh) = c.get("web", "a", Some(&bad));
        assert!(r.is_err() && !fresh);
        let good = tls_secret(crt.as_bytes(), key.as_bytes());
        let (r, fresh) = c.get("web", "a", Some(&good));
        assert!(r.is_ok() && fresh);
        let (r, fresh) = c.get("web", "a", Some(&good));
        assert!(r.is_ok() && !fresh);
    }

    #[test]
    fn default_certificate_is_made() {
        let ck = default_certificate().unwrap();
        assert!(ck.keys_match().is_ok());
    }
}
