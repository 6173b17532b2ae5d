//! Keeps a multi-endpoint client's balancer on the etcd members that answer.
//!
//! etcd-client balances requests over all endpoints given, and a member that is down (or whose
//! name no longer resolves, as a stopped container's) keeps receiving its share, each failing
//! with "unavailable". etcdctl's balancer avoids such members; this does the same: one small
//! client per endpoint asks its member's `status` every [`PROBE_INTERVAL`]; members that do
//! not answer are removed from the main client's balancer and put back when they answer again.
//! The last answering member is never removed (with none answering, all stay in). The first
//! round runs before [`crate::Connection::connect`] returns, so one-shot tools start on the
//! members that answer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// How often each member is asked.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// The balancer's endpoints after a probe round (pure): the answering ones, or all of them
/// when none answers (a total outage is no reason to forget where etcd is).
pub fn wanted(all: &[String], answering: &BTreeSet<String>) -> BTreeSet<String> {
    let up: BTreeSet<String> = all
        .iter()
        .filter(|e| answering.contains(*e))
        .cloned()
        .collect();
    if up.is_empty() {
        all.iter().cloned().collect()
    } else {
        up
    }
}

/// Aborts the probe task when the last registry clone goes.
#[derive(Debug)]
pub(crate) struct Keeper(tokio::task::JoinHandle<()>);

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Probes {
    endpoints: Vec<String>,
    clients: Vec<Option<Client>>,
    options: ConnectOptions,
    timeout: Duration,
}

impl Probes {
    async fn answering(&mut self) -> BTreeSet<String> {
        let rounds = self
            .endpoints
            .iter()
            .zip(self.clients.iter_mut())
            .map(|(ep, slot)| {
                let options = self.options.clone();
                let timeout = self.timeout;
                async move {
                    let ok = tokio::time::timeout(timeout, async {
                        if slot.is_none() {
                            *slot = Client::connect([ep.as_str()], Some(options)).await.ok();
                        }
                        match slot {
                            Some(c) => c.status().await.is_ok(),
                            None => false,
                        }
                    })
                    .await
                    .unwrap_or(false);
                    ok.then(|| ep.clone())
                }
            });
        futures::future::join_all(rounds)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Applies `want` to the balancer (currently `have`): removals after insertions, so it never
/// runs empty.
async fn apply(client: &Client, have: &mut BTreeSet<String>, want: BTreeSet<String>) {
    for ep in want.difference(have) {
        if client.add_endpoint(ep).await.is_ok() {
            tracing::info!(endpoint = %ep, "etcd member answers again: back in the balancer");
        }
    }
    for ep in have.difference(&want) {
        if client.remove_endpoint(ep).await.is_ok() {
            tracing::warn!(endpoint = %ep, "etcd member does not answer: out of the balancer until it does");
        }
    }
    *have = want;
}

/// With more than one endpoint: one probe round now, then a task that keeps probing.
pub(crate) async fn keep(
    client: &Client,
    endpoints: &[String],
    options: ConnectOptions,
    timeout: Duration,
) -> Option<Arc<Keeper>> {
    if endpoints.len() < 2 {
        return None;
    }
    let mut probes = Probes {
        endpoints: endpoints.to_vec(),
        clients: vec![None; endpoints.len()],
        options,
        timeout,
    };
    let mut have: BTreeSet<String> = endpoints.iter().cloned().collect();
    let want = wanted(endpoints, &probes.answering().await);
    apply(client, &mut have, want).await;
    let client = client.clone();
    let all = endpoints.to_vec();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let want = wanted(&all, &probes.answering().await);
            apply(&client, &mut have, want).await;
        }
    });
    Some(Arc::new(Keeper(task)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn answering_members_only_or_all_when_none_answers() {
        let all: Vec<String> = ["http://a:2379", "http://b:2379", "http://c:2379"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            wanted(&all, &set(&["http://a:2379", "http://c:2379"])),
            set(&["http://a:2379", "http://c:2379"])
        );
        assert_eq!(
            wanted(&all, &set(&[])),
            set(&all.iter().map(String::as_str).collect::<Vec<_>>())
        );
        // An answer from an endpoint we were not given changes nothing.
        assert_eq!(
            wanted(&all, &set(&["http://x:2379", "http://b:2379"])),
            set(&["http://b:2379"])
        );
    }
}
