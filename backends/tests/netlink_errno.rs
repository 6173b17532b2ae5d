//! RtNetlink against the real kernel, in an anonymous network namespace of a thread of its own
//! (nothing outside it is touched): refusals keep the kernel's errno, deletes of what is gone
//! succeed. Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use backends::netlink::{Errno, Mac, Netlink, Route, VxlanParams};
use backends::netlink_rt::RtNetlink;

#[test]
fn kernel_refusals_keep_their_errno() {
    if !test_support::require(test_support::is_root(), "needs root (network namespaces)") {
        return;
    }
    test_support::in_new_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = RtNetlink::connect().unwrap();
            let lo = nl.link_by_name("lo").await.unwrap().unwrap();
            nl.set_link_mtu_up(lo.index, 65536).await.unwrap();
            let params = VxlanParams {
                vni: 1,
                port: 0,
                local: Ipv4Addr::LOCALHOST.into(),
                link: lo.index,
                learning: false,
                gbp: false,
            };
            let mac = Mac([0x0a, 0x58, 0, 0, 0, 1]);
            let index = nl
                .create_vxlan("flannel.1", &params, mac, 1450)
                .await
                .unwrap();
            let again = nl
                .create_vxlan("flannel.1", &params, mac, 1450)
                .await
                .unwrap_err();
            assert_eq!(again.errno(), Some(Errno::EEXIST), "{again}");
            assert!(again.to_string().contains("File exists"), "{again}");
            let missing = nl.set_link_mtu_up(index + 1000, 1450).await.unwrap_err();
            assert_eq!(missing.errno(), Some(Errno::ENODEV), "{missing}");
            assert!(!missing.is_not_supported());
            // Deleting what is not there is fine.
            nl.del_route(Route {
                dst: "10.99.1.0/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 99, 1, 0).into()),
                oif: index,
                onlink: true,
            })
            .await
            .unwrap();
            nl.delete_link(index).await.unwrap();
            nl.delete_link(index).await.unwrap();
            assert!(nl.link_by_name("flannel.1").await.unwrap().is_none());
        });
    })
    .unwrap();
}
