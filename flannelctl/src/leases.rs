//! `flannelctl leases`: the subnet leases in etcd as a table (subnet, public IP, backend,
//! time left on its etcd lease or `reservation`) or JSON for scripts. `leases revoke SUBNET`
//! removes a lease now: for a node that is gone for good, whose lease would otherwise hold its
//! subnet, and its peers' routes to it, for the rest of flannel's 24 h TTL.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde_json::{json, Value};
use subnet_lease::{Lease, LeaseAttrs, LeaseStore, SubnetKey};

use crate::common::{align, EtcdFlags};
use crate::config::connect;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LeasesArgs {
    #[command(subcommand)]
    cmd: Option<LeasesCmd>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

#[derive(Debug, Subcommand)]
pub enum LeasesCmd {
    /// Remove the lease of SUBNET (e.g. 10.244.3.0/24) now: its peers drop their routes to it.
    /// For a node that is gone; a node still running takes a new lease at its next renewal.
    Revoke { subnet: String },
}

/// SUBNET as given (`10.244.3.0/24` or the key form `10.244.3.0-24`), pure.
pub fn parse_subnet(text: &str) -> Result<IpNet> {
    text.replace('-', "/")
        .parse::<IpNet>()
        .with_context(|| format!("{text:?} is not a subnet like 10.244.3.0/24 or fd10:0:0:3::/64"))
}

/// A lease's subnets for people: `10.5.52.0/24`, `fd10:0:0:11::/64`, or both joined by a comma.
pub fn subnets(key: &SubnetKey) -> String {
    let v4 = key.ipv4.map(|n| n.to_string());
    let v6 = key.ipv6.map(|n| n.to_string());
    v4.into_iter().chain(v6).collect::<Vec<_>>().join(",")
}

/// A lease's public address(es): PublicIP, PublicIPv6, or both joined by a comma (an
/// IPv6-only lease's `"PublicIP":"0.0.0.0"` is not shown).
pub fn public_ips(a: &LeaseAttrs) -> String {
    let v4 =
        (!a.public_ip.is_unspecified() || a.public_ipv6.is_none()).then(|| a.public_ip.to_string());
    v4.into_iter()
        .chain(a.public_ipv6.map(|v6| v6.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `net` names (one of) the subnet(s) of `key`.
fn names(key: &SubnetKey, net: IpNet) -> bool {
    match net {
        IpNet::V4(n) => key.ipv4 == Some(n),
        IpNet::V6(n) => key.ipv6 == Some(n),
    }
}

/// A lease with the seconds left on its etcd lease (`None`: a reservation, no TTL).
pub struct Row {
    pub lease: Lease,
    pub ttl: Option<i64>,
}

/// The table (pure): header, then one line per lease in subnet order.
pub fn table(rows: &[Row]) -> String {
    let mut out = vec![["SUBNET", "PUBLIC-IP", "BACKEND", "EXPIRES"]
        .map(String::from)
        .to_vec()];
    for r in rows {
        let a = &r.lease.attrs;
        out.push(vec![
            subnets(&r.lease.key),
            public_ips(a),
            if a.backend_type.is_empty() {
                "<none>".into()
            } else {
                a.backend_type.clone()
            },
            match r.ttl {
                None => "reservation".into(),
                Some(s) if s <= 0 => "expired".into(),
                Some(s) => format!("in {s}s"),
            },
        ]);
    }
    align(&out)
}

/// The JSON (pure): one object per lease, flannel's attributes as stored.
pub fn json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "subnet": subnets(&r.lease.key),
                    "key": r.lease.key.to_string(),
                    "attrs": r.lease.attrs,
                    "reservation": r.ttl.is_none(),
                    "ttlSeconds": r.ttl,
                })
            })
            .collect(),
    )
}

pub async fn fetch(etcd: &EtcdFlags) -> Result<Vec<Row>> {
    let reg = connect(etcd).await?;
    let list = reg.list_leases().await?;
    for (key, why) in &list.invalid {
        eprintln!("warning: {key} is not a lease: {why}");
    }
    let mut rows = Vec::new();
    let mut client = reg.client();
    for lease in list.leases {
        let ttl = if lease.is_reservation() {
            None
        } else {
            // A lease that expired between the list and this call reports -1.
            Some(
                client
                    .lease_time_to_live(lease.etcd_lease, None)
                    .await
                    .map(|r| r.ttl())
                    .unwrap_or(-1),
            )
        };
        rows.push(Row { lease, ttl });
    }
    rows.sort_by_key(|r| r.lease.key);
    Ok(rows)
}

async fn revoke(etcd: &EtcdFlags, subnet: &str) -> Result<()> {
    let net = parse_subnet(subnet)?;
    let reg = connect(etcd).await?;
    let list = reg.list_leases().await?;
    let Some(lease) = list.leases.into_iter().find(|l| names(&l.key, net)) else {
        bail!("no lease for {net} (see `flannelctl leases`)");
    };
    if lease.is_reservation() {
        bail!("{net} is a reservation (no TTL), not a node's lease; it stays");
    }
    if !reg.delete_lease(&lease).await? {
        bail!("the lease of {net} changed while this command ran; run it again");
    }
    // The key is gone; the etcd lease that kept it has nothing left to keep. A renewal that
    // raced us already failed or will: either way the node takes a new lease.
    if let Err(e) = reg.revoke(lease.etcd_lease).await {
        if !e.is_lease_not_found() {
            eprintln!("warning: revoking etcd lease {:x}: {e}", lease.etcd_lease);
        }
    }
    println!("lease {net} of {} revoked", lease.attrs.public_ip);
    Ok(())
}

pub async fn run(etcd: &EtcdFlags, args: LeasesArgs) -> Result<()> {
    if let Some(LeasesCmd::Revoke { subnet }) = &args.cmd {
        return revoke(etcd, subnet).await;
    }
    let rows = fetch(etcd).await?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&json(&rows))?),
        Format::Table if rows.is_empty() => eprintln!("No leases"),
        Format::Table => print!("{}", table(&rows)),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use subnet_lease::{LeaseAttrs, SubnetKey};

    fn row(subnet: &str, ip: &str, backend: &str, ttl: Option<i64>) -> Row {
        Row {
            lease: Lease {
                key: SubnetKey::v4(subnet.parse().unwrap()),
                attrs: LeaseAttrs::new(ip.parse().unwrap(), backend),
                etcd_lease: if ttl.is_some() { 7 } else { 0 },
                mod_revision: 1,
            },
            ttl,
        }
    }

    #[test]
    fn dual_stack_and_ipv6_only_leases_show_both_families() {
        let dual = SubnetKey::parse("10.7.85.0-24&fd10:0:0:11::-64").unwrap();
        assert_eq!(subnets(&dual), "10.7.85.0/24,fd10:0:0:11::/64");
        let v6 = SubnetKey::parse("0.0.0.0-0&fd10:0:0:12::-64").unwrap();
        assert_eq!(subnets(&v6), "fd10:0:0:12::/64");
        let mut a = LeaseAttrs::new("0.0.0.0".parse().unwrap(), "vxlan");
        assert_eq!(public_ips(&a), "0.0.0.0");
        a.public_ipv6 = Some("fd00:210::12".parse().unwrap());
        assert_eq!(public_ips(&a), "fd00:210::12");
        a.public_ip = "192.168.210.11".parse().unwrap();
        assert_eq!(public_ips(&a), "192.168.210.11,fd00:210::12");
        assert!(names(&v6, "fd10:0:0:12::/64".parse().unwrap()));
        assert!(!names(&v6, "10.7.85.0/24".parse().unwrap()));
        assert!(names(&dual, parse_subnet("10.7.85.0-24").unwrap()));
    }

    #[test]
    fn table_and_json() {
        let rows = [
            row("10.5.1.0/24", "192.0.2.1", "vxlan", Some(86000)),
            row("10.5.20.0/24", "192.0.2.20", "", None),
        ];
        assert_eq!(
            table(&rows),
            "SUBNET         PUBLIC-IP    BACKEND   EXPIRES\n\
             10.5.1.0/24    192.0.2.1    vxlan     in 86000s\n\
             10.5.20.0/24   192.0.2.20   <none>    reservation\n"
        );
        let j = json(&rows);
        assert_eq!(j[0]["key"], "10.5.1.0-24");
        assert_eq!(j[0]["attrs"]["PublicIP"], "192.0.2.1");
        assert_eq!(j[1]["reservation"], true);
        assert_eq!(j[1]["ttlSeconds"], Value::Null);
    }
}
