//! `alloc`: lease a subnet and publish it, with no data plane (flannel's alloc backend).

use async_trait::async_trait;
use subnet_lease::manager::Event;
use subnet_lease::{Lease, SubnetKey};

use crate::{Backend, BackendError, ExternalInterface, PeerTable};

#[derive(Debug)]
pub struct AllocBackend {
    mtu: u32,
    peers: PeerTable,
}

impl AllocBackend {
    pub fn new(ext: &ExternalInterface) -> Self {
        AllocBackend {
            mtu: ext.mtu,
            peers: PeerTable::default(),
        }
    }
}

#[async_trait]
impl Backend for AllocBackend {
    fn backend_type(&self) -> &'static str {
        "alloc"
    }

    fn backend_data(&self) -> Option<serde_json::Value> {
        None
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn set_lease(&mut self, _own: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    fn peer_event(&mut self, ev: &Event) {
        self.peers.apply(ev);
    }

    async fn reconcile(&mut self) -> Result<usize, BackendError> {
        // No data plane: peers need nothing from this node.
        Ok(0)
    }

    async fn teardown(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn peer_keys(&self) -> Vec<SubnetKey> {
        self.peers.leases().map(|l| l.key).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::netlink::FakeNetlink;
    use std::sync::Arc;

    #[tokio::test]
    async fn publishes_alloc_without_data_and_interface_mtu() {
        let ctx = crate::testing::ctx(
            Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500)),
            true,
            false,
        );
        let cfg =
            subnet_lease::config::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#)
                .unwrap()
                .config;
        let (b, notes) = crate::create(&cfg.backend, &ctx).await.unwrap();
        assert!(notes.is_empty());
        assert_eq!(b.backend_type(), "alloc");
        assert_eq!(b.backend_data(), None);
        assert_eq!(b.mtu(), 1500);
        // A type without a data plane in this build (the config parser only lets known types
        // through; the factory still never fails on one): lease-only, said in a warning.
        let cfg = subnet_lease::BackendConfig {
            backend_type: "ipip".into(),
            options: Default::default(),
        };
        let (b, notes) = crate::create(&cfg, &ctx).await.unwrap();
        assert_eq!(b.backend_type(), "alloc");
        assert!(notes[0].contains("\"ipip\""));
    }

    #[tokio::test]
    async fn ipv6_only_alloc_has_no_data_and_the_interface_mtu() {
        let ctx = crate::testing::ctx(
            Arc::new(FakeNetlink::with_underlay(2, "eth0", 1500)),
            false,
            true,
        );
        let cfg = subnet_lease::BackendConfig {
            backend_type: "alloc".into(),
            options: Default::default(),
        };
        let (b, _) = crate::create(&cfg, &ctx).await.unwrap();
        assert_eq!(
            (b.backend_data(), b.backend_v6_data(), b.mtu()),
            (None, None, 1500)
        );
    }
}
