//! `alloc`: lease a subnet and publish it, with no data plane (flannel's alloc backend).

use subnet_lease::manager::Event;

use crate::{Backend, BackendError, ExternalInterface};

#[derive(Debug)]
pub struct AllocBackend {
    mtu: u32,
}

impl AllocBackend {
    pub fn new(ext: &ExternalInterface) -> Self {
        AllocBackend { mtu: ext.mtu }
    }
}

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

    fn handle(&mut self, _event: &Event) -> Result<(), BackendError> {
        // No data plane: peers need no routes from this node.
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn publishes_alloc_without_data_and_interface_mtu() {
        let ext = ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_ip: Ipv4Addr::new(10, 0, 0, 1),
            public_ip: Ipv4Addr::new(10, 0, 0, 1),
            mtu: 1500,
        };
        let cfg =
            subnet_lease::config::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#)
                .unwrap()
                .config;
        let (b, note) = crate::create(&cfg.backend, &ext).unwrap();
        assert!(note.is_none());
        assert_eq!(b.backend_type(), "alloc");
        assert_eq!(b.backend_data(), None);
        assert_eq!(b.mtu(), 1500);
        let cfg = subnet_lease::config::parse(r#"{"Network":"10.5.0.0/16"}"#)
            .unwrap()
            .config;
        let (b, note) = crate::create(&cfg.backend, &ext).unwrap();
        assert_eq!(b.backend_type(), "alloc");
        assert!(note.unwrap().contains("\"vxlan\""));
    }
}
