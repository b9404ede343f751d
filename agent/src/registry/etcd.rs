//! The etcd backend: lookups, the watch for a vanished entry, and the
//! publisher that keeps this agent's key alive.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{oneshot, watch};

use super::{Entry, Gone, Listing, RegistryError, RegistryUrl};

/// How long one etcd call may take before the lookup fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause before a lost watch or publication is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// A client of one etcd cluster, under one key prefix.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    url: RegistryUrl,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("url", &self.url.to_string()).finish()
    }
}

impl Etcd {
    /// A client of `url`'s endpoints; connects when first used.
    pub async fn connect(url: &RegistryUrl) -> anyhow::Result<Etcd> {
        let endpoints: Vec<String> = url.endpoints.iter().map(|e| format!("http://{e}")).collect();
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&endpoints, Some(opts))
            .await
            .map_err(|e| anyhow::anyhow!("registry {url}: cannot set up an etcd client: {e}"))?;
        Ok(Etcd { client, url: url.clone() })
    }

    pub fn url(&self) -> &RegistryUrl {
        &self.url
    }

    /// The folder of all agents' keys.
    fn dir(&self) -> String {
        format!("/{}/agents/", self.url.prefix)
    }

    /// The key of `agent_id`.
    pub fn key(&self, agent_id: &str) -> String {
        format!("{}{agent_id}", self.dir())
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> RegistryError {
        let mut detail = e.to_string();
        if !detail.contains("running") {
            detail.push_str(" (is etcd running there?)");
        }
        RegistryError::Unreachable { url: self.url.to_string(), detail }
    }

    /// Whether etcd answers now.
    pub async fn probe(&self) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        let call = c.get(self.key("probe"), Some(GetOptions::new().with_keys_only()));
        with_limit(call).await.map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// The raw value at `agent_id`'s key and the store's revision.
    async fn get(&self, agent_id: &str) -> Result<(Option<Vec<u8>>, i64), RegistryError> {
        let mut c = self.client.clone();
        let r = with_limit(c.get(self.key(agent_id), None)).await.map_err(|e| self.unreachable(e))?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok((r.kvs().first().map(|kv| kv.value().to_vec()), rev))
    }

    pub async fn resolve(&self, agent_id: &str) -> Result<Entry, RegistryError> {
        let key = self.key(agent_id);
        match self.get(agent_id).await? {
            (Some(v), _) => Entry::parse(&v, Some(agent_id)).map_err(|reason| RegistryError::Refused { key, reason }),
            (None, _) => Err(RegistryError::NotFound { id: agent_id.into(), source_name: self.url.to_string() }),
        }
    }

    pub async fn list(&self) -> Result<Listing, RegistryError> {
        let mut c = self.client.clone();
        let dir = self.dir();
        let r = with_limit(c.get(dir.clone(), Some(GetOptions::new().with_prefix()))).await.map_err(|e| self.unreachable(e))?;
        let mut listing = Listing::default();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let id = key.strip_prefix(&dir).unwrap_or(&key);
            match Entry::parse(kv.value(), Some(id)) {
                Ok(e) => listing.entries.push(e),
                Err(why) => listing.skipped.push((key, why)),
            }
        }
        Ok(listing)
    }

    /// Waits until `entry`'s instance leaves etcd (see [`super::Registry::gone`]).
    pub async fn gone(&self, entry: &Entry) -> Gone {
        let mut warned = false;
        loop {
            match self.watch_once(entry).await {
                Ok(g) => return g,
                Err(e) => {
                    if !warned {
                        tracing::warn!(peer = %entry.agent_id, "watching the peer's registry entry: {e}; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn watch_once(&self, entry: &Entry) -> anyhow::Result<Gone> {
        let agent_id = entry.agent_id.clone();
        let replaced_or_gone = |value: Option<&[u8]>| -> Option<Gone> {
            let now = value.map(|v| Entry::parse(v, Some(&entry.agent_id)).map(|e| e.epoch).unwrap_or(0));
            match now {
                None => Some(Gone::Vanished { agent_id: agent_id.clone() }),
                Some(epoch) if epoch != entry.epoch => {
                    Some(Gone::Replaced { agent_id: agent_id.clone(), old_epoch: entry.epoch, new_epoch: epoch })
                }
                Some(_) => None,
            }
        };
        let (value, rev) = self.get(&entry.agent_id).await?;
        if let Some(g) = replaced_or_gone(value.as_deref()) {
            return Ok(g);
        }
        let mut c = self.client.clone();
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let mut stream = with_limit(c.watch(self.key(&entry.agent_id), Some(opts))).await?;
        while let Some(r) = stream.message().await? {
            anyhow::ensure!(!r.canceled(), "etcd cancelled the watch: {}", r.cancel_reason());
            for ev in r.events() {
                let value = match ev.event_type() {
                    EventType::Delete => None,
                    EventType::Put => ev.kv().map(|kv| kv.value()),
                };
                if let Some(g) = replaced_or_gone(value) {
                    return Ok(g);
                }
            }
        }
        anyhow::bail!("etcd closed the watch")
    }
}

/// One etcd call, failed after [`CALL_TIMEOUT`] (a stream's first answer
/// included, which the client's own timeout does not bound).
async fn with_limit<T>(call: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{}", etcd_error(&e))),
        Err(_) => anyhow::bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

/// An etcd client error in one line (a gRPC status without the
/// transport's nested details).
fn etcd_error(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => crate::diagnose::status_line(s),
        other => other.to_string(),
    }
}

/// Publication state of this agent's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Not (or no longer) known to be in etcd.
    No,
    /// In etcd under this lease.
    Yes { lease: i64 },
}

/// Keeps this agent's entry in etcd: grants a lease of the TTL, puts the
/// entry under it, renews it every third of the TTL, and after etcd was
/// lost (or the lease expired, or the key was deleted) publishes it again.
/// [`Publisher::withdraw`] deletes it (on an orderly stop).
#[derive(Debug)]
pub struct Publisher {
    state: watch::Receiver<Published>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    etcd: Etcd,
    entry: Entry,
}

impl Publisher {
    pub(super) async fn start(etcd: Etcd, entry: Entry, ttl: Duration, must_reach: bool) -> Result<Publisher, RegistryError> {
        let ttl_secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let first = if must_reach { Some(publish(&etcd, &entry, ttl_secs).await.map_err(|e| etcd.unreachable(e))?) } else { None };
        let (tx, state) = watch::channel(first.map_or(Published::No, |lease| Published::Yes { lease }));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(etcd.clone(), entry.clone(), ttl_secs, first, tx, stopped));
        Ok(Publisher { state, stop: Some(stop), task, etcd, entry })
    }

    /// Whether the entry is in etcd now, and under which lease.
    pub fn state(&self) -> Published {
        *self.state.borrow()
    }

    /// Waits (up to `limit`) until the entry is in etcd.
    pub async fn wait_published(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.state.wait_for(|s| matches!(s, Published::Yes { .. }))).await.is_ok_and(|r| r.is_ok())
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Stops renewing and revokes the lease (the key goes with it).
    pub async fn withdraw(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
        if let Published::Yes { lease } = self.state() {
            let mut c = self.etcd.client.clone();
            match with_limit(c.lease_revoke(lease)).await {
                Ok(_) => tracing::info!(key = %self.etcd.key(&self.entry.agent_id), "withdrawn from the registry"),
                Err(e) => tracing::warn!("withdrawing from the registry: {e} (the key expires with its lease)"),
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Grants a lease and puts `entry` under it; the lease id.
async fn publish(etcd: &Etcd, entry: &Entry, ttl_secs: i64) -> anyhow::Result<i64> {
    if let (Some(v), _) = etcd.get(&entry.agent_id).await? {
        if let Some(o) = Entry::parse(&v, Some(&entry.agent_id)).ok().filter(|o| o.epoch > entry.epoch) {
            return Err(Superseded { agent_id: o.agent_id, theirs: o.epoch, ours: entry.epoch, address: o.address }.into());
        }
    }
    let mut c = etcd.client.clone();
    let lease = with_limit(c.lease_grant(ttl_secs, None)).await?.id();
    let opts = PutOptions::new().with_lease(lease);
    with_limit(c.put(etcd.key(&entry.agent_id), entry.to_json(), Some(opts))).await?;
    tracing::info!(key = %etcd.key(&entry.agent_id), address = %entry.address, lease, ttl_secs, "published in the registry");
    Ok(lease)
}

/// The publisher's task: renew while it works, publish again when it did not.
async fn keep(
    etcd: Etcd,
    entry: Entry,
    ttl_secs: i64,
    mut lease: Option<i64>,
    state: watch::Sender<Published>,
    mut stop: oneshot::Receiver<()>,
) {
    let key = etcd.key(&entry.agent_id);
    let mut outage: Option<String> = None;
    loop {
        let life = async {
            let id = match lease {
                Some(id) => id,
                None => {
                    let id = publish(&etcd, &entry, ttl_secs).await?;
                    lease = Some(id);
                    id
                }
            };
            let _ = state.send(Published::Yes { lease: id });
            if outage.take().is_some() {
                tracing::info!(%key, "etcd is back: published again");
            }
            renew(&etcd, &entry, id, ttl_secs).await
        };
        let err = tokio::select! {
            r = life => r.err().unwrap_or_else(|| anyhow::anyhow!("renewal ended")),
            _ = &mut stop => return,
        };
        let _ = state.send(Published::No);
        lease = None;
        if err.is::<Superseded>() {
            tracing::error!(%key, "{err}");
            return;
        }
        if outage.is_none() {
            tracing::warn!(%key, "registry {}: {err}; the agent keeps serving and publishes again when etcd answers", etcd.url);
            outage = Some(err.to_string());
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = &mut stop => return,
        }
    }
}

/// Renews `lease` every third of the TTL and checks the key still holds
/// this instance; returns why it stopped.
async fn renew(etcd: &Etcd, entry: &Entry, lease: i64, ttl_secs: i64) -> anyhow::Result<()> {
    let mut c = etcd.client.clone();
    let (mut keeper, mut answers) = with_limit(c.lease_keep_alive(lease)).await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(ttl_secs as f64 / 3.0));
    loop {
        tick.tick().await;
        keeper.keep_alive().await.map_err(|e| anyhow::anyhow!("renewing the lease: {}", etcd_error(&e)))?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, answers.message()).await;
        match answer {
            Ok(Ok(Some(a))) if a.ttl() > 0 => {}
            Ok(Ok(Some(_))) => anyhow::bail!("the lease expired"),
            Ok(Ok(None)) => anyhow::bail!("etcd closed the lease's keep-alive stream"),
            Ok(Err(e)) => anyhow::bail!("renewing the lease: {}", etcd_error(&e)),
            Err(_) => anyhow::bail!("no keep-alive answer within {CALL_TIMEOUT:?}"),
        }
        match etcd.get(&entry.agent_id).await? {
            (Some(v), _) if v == entry.to_json().as_bytes() => {}
            (Some(v), _) => {
                let other = Entry::parse(&v, Some(&entry.agent_id));
                anyhow::bail!(
                    "another instance holds agent id `{}` ({}): two agents share one id",
                    entry.agent_id,
                    match other {
                        Ok(o) => format!("epoch {}, address {}", o.epoch, o.address),
                        Err(r) => r.to_string(),
                    }
                );
            }
            (None, _) => anyhow::bail!("the key was deleted"),
        }
    }
}

/// A newer instance of this agent (a restart under its id) holds the key.
#[derive(Debug, thiserror::Error)]
#[error("a newer instance of agent `{agent_id}` (epoch {theirs}, address {address}) holds its key: this one ({ours}) stops publishing")]
struct Superseded {
    agent_id: String,
    theirs: u64,
    ours: u64,
    address: String,
}
