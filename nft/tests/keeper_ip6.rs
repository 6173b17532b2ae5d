//! TableKeeper on an `ip6` table with the real `nft`, in an anonymous network namespace of a
//! thread of its own (it goes when the thread ends, also on a panic; no other namespace's
//! ruleset is touched): installs the table, leaves it alone while unchanged, re-installs it
//! after a hand edit, keeps it apart from the `ip` table of the same name, and removes it.
//! Root; skips without it, fails under CI.

#![allow(clippy::unwrap_used)]

use nft::{Family, NftCommand, TableKeeper};

const SCRIPT: &str = "\
add table ip6 kept
delete table ip6 kept
add table ip6 kept
add set ip6 kept cluster { type ipv6_addr; flags interval; }
add element ip6 kept cluster { fd10::/48 }
add chain ip6 kept postrouting { type nat hook postrouting priority srcnat; }
add rule ip6 kept postrouting ip6 saddr @cluster ip6 daddr != ff00::/8 masquerade fully-random
";

#[test]
fn an_ip6_table_is_kept() {
    if !test_support::require_root_with(&["nft"]) {
        return;
    }
    test_support::in_new_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(keep());
    })
    .unwrap();
}

async fn keep() {
    let nft = NftCommand::default();
    assert_eq!(nft.list_table(Family::Ip6, "kept").await.unwrap(), None);
    // An `ip` table of the same name, which the ip6 keeper must not touch.
    nft.apply("add table ip kept\nadd chain ip kept c\n")
        .await
        .unwrap();

    let mut k = TableKeeper::new(nft.clone(), Family::Ip6, "kept");
    k.set(Some(SCRIPT.to_string()));
    assert!(k.ensure().await.unwrap(), "installed");
    let listing = nft.list_table(Family::Ip6, "kept").await.unwrap().unwrap();
    assert!(listing.starts_with("table ip6 kept {"), "{listing}");
    assert!(listing.contains("fd10::/48"), "{listing}");
    assert!(
        nft.chain_exists(Family::Ip6, "kept", "postrouting").await
            && !nft.chain_exists(Family::Ip, "kept", "postrouting").await
    );
    assert!(!k.ensure().await.unwrap(), "unchanged: left alone");

    // A hand edit is drift: the whole table is installed again.
    nft.apply("flush chain ip6 kept postrouting\n")
        .await
        .unwrap();
    assert!(k.ensure().await.unwrap(), "re-installed");
    assert_eq!(
        nft.list_table(Family::Ip6, "kept")
            .await
            .unwrap()
            .as_deref(),
        Some(listing.as_str())
    );

    // Absent: the ip6 table goes, the ip one stays.
    k.set(None);
    assert!(k.ensure().await.unwrap(), "removed");
    assert_eq!(nft.list_table(Family::Ip6, "kept").await.unwrap(), None);
    assert!(nft.chain_exists(Family::Ip, "kept", "c").await);
}
