//! Where agents find each other: etcd (`--registry etcd://HOST:PORT/PREFIX`)
//! or a static file (`--peers FILE`).
//!
//! Every agent publishes one [`Entry`] (its address, role, id, rank, host,
//! memory kind, protocol version and start epoch) under
//! `/PREFIX/agents/AGENT_ID`, bound to an etcd lease that the agent keeps
//! alive ([`Publisher`]); an agent that dies disappears within the lease's
//! TTL. A [`Registry`] resolves an agent id to its entry, lists entries by
//! role and tells when an entry vanishes ([`Registry::gone`]).
//!
//! An entry is only a claim of where an agent listens: it never grants
//! access. Whoever dials the address still has to pass the handshake, which
//! the cluster secret decides. Entries that this agent could not talk to (a
//! wrong protocol version, an address that is not `host:port`, a key that
//! names another agent id) are refused when resolved and skipped when
//! listed, with the reason.

mod entry;
mod etcd;
mod file;

use std::path::Path;
use std::time::Duration;

pub use entry::{check_agent_id, Entry, Refused, MEMORY_KINDS};
pub use etcd::{Etcd, Published, Publisher};
pub use file::StaticPeers;

/// This host's name, as an agent publishes it in its entry.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}

use crate::agent::Role;

/// A parsed `--registry` URL: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// `host:port` of each etcd endpoint.
    pub endpoints: Vec<String>,
    /// The key prefix, without slashes at either end (`kvrail` if none).
    pub prefix: String,
}

/// The etcd client port when a URL gives none.
pub const ETCD_DEFAULT_PORT: u16 = 2379;

impl std::str::FromStr for RegistryUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<RegistryUrl, String> {
        const FORM: &str = "expected etcd://HOST:PORT/PREFIX (several endpoints: etcd://H1:P1,H2:P2/PREFIX)";
        let rest = s.strip_prefix("etcd://").ok_or_else(|| format!("`{s}` is not an etcd URL: {FORM}"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { "kvrail" } else { prefix };
        if prefix.contains("//") || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("`{s}`: the prefix `{prefix}` has empty segments or blanks: {FORM}"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                    let port: u16 = port.parse().map_err(|_| format!("`{s}`: `{port}` is not a port number: {FORM}"))?;
                    (host, port)
                }
                _ => (h, ETCD_DEFAULT_PORT),
            };
            if host.is_empty() || !entry::is_host(host) {
                return Err(format!("`{s}`: `{h}` is not HOST:PORT: {FORM}"));
            }
            if port == 0 {
                return Err(format!("`{s}`: port 0 cannot be dialled: {FORM}"));
            }
            endpoints.push(format!("{host}:{port}"));
        }
        Ok(RegistryUrl { endpoints, prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

/// Why a lookup found no usable entry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("agent `{id}` is not registered in {source_name}")]
    NotFound { id: String, source_name: String },
    #[error("registry entry {key} refused: {reason}")]
    Refused { key: String, reason: Refused },
    #[error("registry {url} unreachable: {detail}")]
    Unreachable { url: String, detail: String },
}

/// The entries of a listing, and the ones skipped with the reason.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// (key, why) of each entry left out.
    pub skipped: Vec<(String, Refused)>,
}

/// How a watched entry went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// Its key was deleted: the agent withdrew or its lease expired.
    Vanished { agent_id: String },
    /// Another instance of the agent (a restart) now holds its id.
    Replaced { agent_id: String, old_epoch: u64, new_epoch: u64 },
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::Vanished { agent_id } => {
                write!(f, "peer `{agent_id}` left the registry (it stopped, or its lease expired: it stopped answering)")
            }
            Gone::Replaced { agent_id, old_epoch, new_epoch } => {
                write!(f, "peer `{agent_id}` restarted (epoch {old_epoch} replaced by {new_epoch})")
            }
        }
    }
}

/// Where peers are looked up: etcd, a static file, or both (the file
/// answers what etcd cannot: an id etcd does not hold, or every lookup
/// while etcd is unreachable).
#[derive(Debug, Clone)]
pub struct Registry {
    etcd: Option<Etcd>,
    file: Option<StaticPeers>,
}

impl Registry {
    /// A registry over `url` and/or `peers`; `None` if neither is given. The
    /// file is read (and checked) now; etcd is not contacted yet.
    pub async fn open(url: Option<&RegistryUrl>, peers: Option<&Path>) -> anyhow::Result<Option<Registry>> {
        let file = peers.map(StaticPeers::load).transpose()?;
        let etcd = match url {
            Some(u) => Some(Etcd::connect(u).await?),
            None => None,
        };
        Ok((etcd.is_some() || file.is_some()).then_some(Registry { etcd, file }))
    }

    /// The etcd behind this registry, if any.
    pub fn etcd(&self) -> Option<&Etcd> {
        self.etcd.as_ref()
    }

    /// Whether a static file backs this registry.
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Where lookups go, for messages.
    pub fn describe(&self) -> String {
        match (&self.etcd, &self.file) {
            (Some(e), Some(f)) => format!("{} (fallback {})", e.url(), f.path().display()),
            (Some(e), None) => e.url().to_string(),
            (None, Some(f)) => f.path().display().to_string(),
            (None, None) => "no registry".into(),
        }
    }

    /// The usable entry of `agent_id`.
    pub async fn resolve(&self, agent_id: &str) -> Result<Entry, RegistryError> {
        if let Some(etcd) = &self.etcd {
            match etcd.resolve(agent_id).await {
                Ok(e) => return Ok(e),
                Err(RegistryError::NotFound { .. } | RegistryError::Unreachable { .. }) if self.file.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        match &self.file {
            Some(f) => f.resolve(agent_id),
            None => Err(RegistryError::NotFound { id: agent_id.into(), source_name: self.describe() }),
        }
    }

    /// Every usable entry (of `role`, if given), sorted by role, rank (none
    /// last) and id; with a file and etcd, etcd's entry wins for an id in both.
    pub async fn list(&self, role: Option<Role>) -> Result<Listing, RegistryError> {
        let mut listing = Listing::default();
        if let Some(etcd) = &self.etcd {
            match etcd.list().await {
                Ok(l) => listing = l,
                Err(e) if self.file.is_none() => return Err(e),
                Err(e) => tracing::warn!(
                    "{e}; listing {} instead",
                    self.file.as_ref().map(|f| f.path().display().to_string()).unwrap_or_default()
                ),
            }
        }
        if let Some(f) = &self.file {
            for e in f.entries() {
                if !listing.entries.iter().any(|x| x.agent_id == e.agent_id) {
                    listing.entries.push(e.clone());
                }
            }
        }
        listing.entries.retain(|e| role.is_none_or(|r| e.role == r.as_str()));
        listing.entries.sort_by_key(|e| (e.role.clone(), e.rank.is_none(), e.rank, e.agent_id.clone()));
        Ok(listing)
    }

    /// Waits until the entry of `entry.agent_id` (this instance of it,
    /// `entry.epoch`) leaves etcd, and says how. While etcd is unreachable
    /// nothing is concluded (sessions keep working; the watch resumes when
    /// it returns). Never returns for a peer known only from the file.
    pub async fn gone(&self, entry: &Entry) -> Gone {
        match &self.etcd {
            Some(etcd) => etcd.gone(entry).await,
            None => std::future::pending().await,
        }
    }

    /// Publishes `entry` in etcd, bound to a lease of `ttl` that the
    /// returned [`Publisher`] keeps alive (and renews, re-publishing, after
    /// etcd was lost). `must_reach`: fail now if etcd does not answer;
    /// otherwise keep trying in the background. `None` without etcd.
    pub async fn publish(&self, entry: Entry, ttl: Duration, must_reach: bool) -> Result<Option<Publisher>, RegistryError> {
        match &self.etcd {
            Some(etcd) => Publisher::start(etcd.clone(), entry, ttl, must_reach).await.map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_parse_or_say_what_is_expected() {
        let u: RegistryUrl = "etcd://127.0.0.1:2379/kv/rail/".parse().unwrap();
        assert_eq!(u, RegistryUrl { endpoints: vec!["127.0.0.1:2379".into()], prefix: "kv/rail".into() });
        let u: RegistryUrl = "etcd://a:1,b/".parse().unwrap();
        assert_eq!(u.endpoints, ["a:1", "b:2379"]);
        assert_eq!(u.prefix, "kvrail");
        assert_eq!(u.to_string(), "etcd://a:1,b:2379/kvrail");
        let u: RegistryUrl = "etcd://[::1]:23/p".parse().unwrap();
        assert_eq!(u.endpoints, ["[::1]:23"]);
        for (bad, says) in [
            ("http://127.0.0.1:2379/p", "not an etcd URL"),
            ("etcd://127.0.0.1:http/p", "not a port number"),
            ("etcd://127.0.0.1:0/p", "port 0"),
            ("etcd:///p", "is not HOST:PORT"),
            ("etcd://a b:1/p", "is not HOST:PORT"),
            ("etcd://h:1/a//b", "empty segments"),
        ] {
            let e = bad.parse::<RegistryUrl>().unwrap_err();
            assert!(e.contains(says) && e.contains("etcd://HOST:PORT/PREFIX"), "{bad}: {e}");
        }
    }
}

/// How often a decode agent looks for sessions whose peer it does not
/// watch in the registry yet.
const WATCH_NEW_PEERS: Duration = Duration::from_secs(1);
/// How long a vanished entry may take to come back before its peer's
/// session is closed: a live agent whose key was lost (etcd restarted
/// without it, a lease lost in a partition) puts it back within a third of
/// its TTL.
const COME_BACK: Duration = Duration::from_secs(3);

/// A decode agent's watch over its peers' registry entries: for every
/// prefill agent it holds a session with, once that instance's entry
/// leaves etcd and does not come back within [`COME_BACK`], the session is
/// closed and its pending requests fail with the registry's words (before
/// the session's own lease would). A restart under the same id is the
/// handshake's to fence, not this watch's. Runs until the agent stops.
pub async fn fail_departed_peers(reg: Registry, agent: std::sync::Arc<crate::agent::Agent>) {
    if reg.etcd().is_none() {
        return;
    }
    let watched: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Default::default();
    loop {
        for peer in crate::agent::decode::open_peers(&agent) {
            if !watched.lock().expect("lock").insert(peer.clone()) {
                continue;
            }
            let (reg, agent, watched) = (reg.clone(), agent.clone(), watched.clone());
            tokio::spawn(async move {
                if let Ok(entry) = reg.resolve(&peer).await {
                    if let Gone::Vanished { .. } = reg.gone(&entry).await {
                        tokio::time::sleep(COME_BACK).await;
                        // etcd gone meanwhile concludes nothing.
                        let back = match reg.resolve(&peer).await {
                            Ok(e) => e.epoch == entry.epoch,
                            Err(e) => matches!(e, RegistryError::Unreachable { .. }),
                        };
                        if !back {
                            let why = Gone::Vanished { agent_id: peer.clone() }.to_string();
                            tracing::warn!(peer = %peer, "{why}: failing its requests");
                            crate::agent::decode::peer_left(&agent, &peer, why).await;
                        }
                    }
                }
                // Watched again (a new instance, or an entry not there yet)
                // on the next look.
                watched.lock().expect("lock").remove(&peer);
            });
        }
        tokio::time::sleep(WATCH_NEW_PEERS).await;
    }
}

/// The registry as a decode agent's dial resolver: a prefill agent's id to
/// the address in its entry. An id the registry does not hold resolves to
/// nothing (the request then fails naming it); a refused entry or an
/// unreachable registry fails the request with that line.
#[derive(Debug, Clone)]
pub struct RegistryResolver(pub Registry);

impl crate::agent::decode::dial::Resolver for RegistryResolver {
    fn resolve<'a>(&'a self, agent_id: &'a str) -> crate::agent::decode::dial::Resolved<'a> {
        use crate::agent::error::{AgentError, ErrorKind, Failure};
        Box::pin(async move {
            match self.0.resolve(agent_id).await {
                Ok(entry) => Ok(Some(entry.address)),
                Err(RegistryError::NotFound { .. }) => Ok(None),
                Err(e @ RegistryError::Refused { .. }) => Err(AgentError::Precondition(e.to_string())),
                Err(e @ RegistryError::Unreachable { .. }) => Err(AgentError::Failed(Failure::new(ErrorKind::Unavailable, e.to_string()))),
            }
        })
    }
}
