//! etcd TLS (server-only and mutual) and user/password authentication, against a real etcd.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use subnet_lease::{EtcdLeaseStore, EtcdOptions, LeaseStore};
use test_support::{find_program, require, Etcd, TlsFiles};

fn opts(etcd: &Etcd) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        timeout: Duration::from_secs(3),
        ..EtcdOptions::default()
    }
}

fn tls_etcd(client_cert_auth: bool) -> Option<(tempfile::TempDir, TlsFiles, Etcd)> {
    if !require(
        find_program("openssl").is_some(),
        "needs the openssl command",
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path(), client_cert_auth).unwrap();
    let etcd = Etcd::start_tls(files.clone())?;
    Some((dir, files, etcd))
}

#[tokio::test]
async fn ca_only_tls_encrypts_and_verifies_the_server() {
    let Some((_dir, files, etcd)) = tls_etcd(false) else {
        return;
    };
    assert!(etcd.endpoint().starts_with("https://"));
    let reg = EtcdLeaseStore::connect(&EtcdOptions {
        ca_file: Some(files.ca.clone()),
        ..opts(&etcd)
    })
    .await
    .unwrap();
    assert!(reg.list_leases().await.unwrap().leases.is_empty());
    assert_eq!(reg.get_config().await.unwrap(), None);
    // Without the CA the server's certificate is not trusted: no silent fallback.
    let untrusted = EtcdLeaseStore::connect(&opts(&etcd)).await.unwrap();
    assert!(untrusted.list_leases().await.is_err());
}

#[tokio::test]
async fn client_certificates_when_etcd_demands_them() {
    let Some((_dir, files, etcd)) = tls_etcd(true) else {
        return;
    };
    let with_cert = EtcdLeaseStore::connect(&EtcdOptions {
        ca_file: Some(files.ca.clone()),
        cert_file: Some(files.client_cert.clone()),
        key_file: Some(files.client_key.clone()),
        ..opts(&etcd)
    })
    .await
    .unwrap();
    with_cert.list_leases().await.unwrap();
    let ca_only = EtcdLeaseStore::connect(&EtcdOptions {
        ca_file: Some(files.ca.clone()),
        ..opts(&etcd)
    })
    .await
    .unwrap();
    assert!(
        ca_only.list_leases().await.is_err(),
        "etcd must refuse a client without a certificate"
    );
    let half = EtcdLeaseStore::connect(&EtcdOptions {
        ca_file: Some(files.ca.clone()),
        cert_file: Some(files.client_cert.clone()),
        ..opts(&etcd)
    })
    .await
    .unwrap_err();
    assert!(
        half.to_string().contains("must be given together"),
        "{half}"
    );
}

#[tokio::test]
async fn username_and_password() {
    let Some(etcd) = Etcd::start() else { return };
    etcd.etcdctl(&["user", "add", "root", "--new-user-password=s3cret"])
        .unwrap();
    etcd.etcdctl(&["auth", "enable"]).unwrap();
    let reg = EtcdLeaseStore::connect(&EtcdOptions {
        username: Some("root".into()),
        password: Some("s3cret".into()),
        ..opts(&etcd)
    })
    .await
    .unwrap();
    reg.list_leases().await.unwrap();
    let wrong = EtcdLeaseStore::connect(&EtcdOptions {
        username: Some("root".into()),
        password: Some("nope".into()),
        ..opts(&etcd)
    })
    .await;
    assert!(wrong.is_err(), "a wrong password is refused at connect");
    let anonymous = EtcdLeaseStore::connect(&opts(&etcd)).await.unwrap();
    assert!(anonymous.list_leases().await.is_err());
}
