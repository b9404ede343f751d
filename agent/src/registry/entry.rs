//! One agent's registry entry, and the checks an entry passes before anyone
//! dials it.

use serde::{Deserialize, Serialize};

/// Memory kinds an entry may advertise for its region.
pub const MEMORY_KINDS: &[&str] = &["host", "cuda"];

/// What an agent publishes about itself (the JSON value of its key, or one
/// line of a peers file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub agent_id: String,
    /// `prefill` or `decode`.
    pub role: String,
    /// `host:port` of the agent's gRPC services (Peer and Control).
    pub address: String,
    /// The agent's rank in its job (Slurm's task id), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// The host the agent runs on.
    pub host: String,
    /// Where its KV region lives: `host` or `cuda`.
    pub memory: String,
    /// The kvrail protocol it speaks.
    pub protocol_version: u32,
    /// This instance of the agent: its start time in nanoseconds since the
    /// Unix epoch (a restart under the same id publishes a larger one).
    #[serde(default)]
    pub epoch: u64,
}

/// Why an entry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a registry entry ({0})")]
    Malformed(String),
    #[error("agent `{agent_id}` speaks protocol v{theirs}, this kvrail speaks v{ours}: upgrade one of them")]
    Protocol { agent_id: String, theirs: u32, ours: u32 },
    #[error("agent `{agent_id}` gives address `{address}`, which is not host:port with a non-zero port")]
    Address { agent_id: String, address: String },
    #[error("the key names agent `{key_id}` but the entry says `{agent_id}`")]
    IdMismatch { key_id: String, agent_id: String },
    #[error("agent `{agent_id}` has role `{role}` (expected prefill or decode)")]
    Role { agent_id: String, role: String },
    #[error("agent `{agent_id}` has memory kind `{memory}` (expected one of {})", MEMORY_KINDS.join(", "))]
    Memory { agent_id: String, memory: String },
    #[error("{0}")]
    Id(String),
}

/// Whether `s` can stand for a host in `host:port`: a DNS name, an IPv4
/// address or a bracketed IPv6 address.
pub(crate) fn is_host(s: &str) -> bool {
    if let Some(v6) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
}

/// Whether `address` is `host:port` with a non-zero port.
fn is_address(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => is_host(host) && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

/// An agent id that can name a registry key: 1 to 128 characters, letters,
/// digits and `-_.:@`.
pub fn check_agent_id(id: &str) -> Result<(), Refused> {
    let ok = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refused::Id(format!("agent id `{id}` cannot name a registry key: use 1 to 128 letters, digits or -_.:@")))
    }
}

impl Entry {
    /// Parses an entry and checks it; `key_id`: the id its key names.
    pub fn parse(bytes: &[u8], key_id: Option<&str>) -> Result<Entry, Refused> {
        let e: Entry = serde_json::from_slice(bytes).map_err(|e| Refused::Malformed(e.to_string()))?;
        e.check(key_id)?;
        Ok(e)
    }

    /// Whether this agent can be dialled by this kvrail.
    pub fn check(&self, key_id: Option<&str>) -> Result<(), Refused> {
        check_agent_id(&self.agent_id)?;
        let agent_id = self.agent_id.clone();
        if let Some(k) = key_id.filter(|k| *k != self.agent_id) {
            return Err(Refused::IdMismatch { key_id: k.into(), agent_id });
        }
        let ours = kvrail_proto::PROTOCOL_VERSION;
        if self.protocol_version != ours {
            return Err(Refused::Protocol { agent_id, theirs: self.protocol_version, ours });
        }
        if !is_address(&self.address) {
            return Err(Refused::Address { agent_id, address: self.address.clone() });
        }
        if !["prefill", "decode"].contains(&self.role.as_str()) {
            return Err(Refused::Role { agent_id, role: self.role.clone() });
        }
        if !MEMORY_KINDS.contains(&self.memory.as_str()) {
            return Err(Refused::Memory { agent_id, memory: self.memory.clone() });
        }
        Ok(())
    }

    /// The JSON an entry is stored as.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an entry serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry(id: &str) -> Entry {
        Entry {
            agent_id: id.into(),
            role: "decode".into(),
            address: "127.0.0.1:4000".into(),
            rank: Some(3),
            host: "n1".into(),
            memory: "host".into(),
            protocol_version: kvrail_proto::PROTOCOL_VERSION,
            epoch: 42,
        }
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_refused_with_the_reason() {
        let good = entry("d-1");
        assert_eq!(Entry::parse(good.to_json().as_bytes(), Some("d-1")).unwrap(), good);
        let cases: Vec<(Entry, &str)> = vec![
            (Entry { protocol_version: 3, ..good.clone() }, "speaks protocol v3"),
            (Entry { address: "nowhere".into(), ..good.clone() }, "not host:port"),
            (Entry { address: "h:0".into(), ..good.clone() }, "not host:port"),
            (Entry { address: "bad host:80".into(), ..good.clone() }, "not host:port"),
            (Entry { role: "router".into(), ..good.clone() }, "role `router`"),
            (Entry { memory: "disk".into(), ..good.clone() }, "memory kind `disk`"),
            (Entry { agent_id: "a/b".into(), ..good.clone() }, "cannot name a registry key"),
        ];
        for (e, says) in cases {
            let r = Entry::parse(e.to_json().as_bytes(), None).unwrap_err().to_string();
            assert!(r.contains(says), "{e:?}: {r}");
        }
        let r = Entry::parse(good.to_json().as_bytes(), Some("d-2")).unwrap_err();
        assert_eq!(r, Refused::IdMismatch { key_id: "d-2".into(), agent_id: "d-1".into() });
        let r = Entry::parse(b"{\"agent_id\":\"x\"}", None).unwrap_err().to_string();
        assert!(r.contains("missing field"), "{r}");
        let with_ipv6 = Entry { address: "[::1]:9".into(), ..good };
        assert!(with_ipv6.check(None).is_ok());
    }
}
