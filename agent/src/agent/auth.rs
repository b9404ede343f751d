//! Cluster-secret authentication of the handshake.
//!
//! Agents share a secret (a file, or the `KVRAIL_CLUSTER_SECRET` variable;
//! never the command line) and never send it. The decode agent hands out
//! one-time nonces; each side proves knowledge of the secret with
//! HMAC-SHA256 over its role, the nonce and the AgentInfo it presents, so a
//! proof cannot be replayed for another nonce, role or region.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use kvrail_proto::v1 as pb;
use sha2::Sha256;

/// Environment variable holding the cluster secret.
pub const SECRET_VAR: &str = "KVRAIL_CLUSTER_SECRET";
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;
/// How long a nonce stays valid.
const NONCE_TTL: Duration = Duration::from_secs(30);
/// Most outstanding nonces (oldest are dropped first).
const MAX_NONCES: usize = 4096;

/// The shared secret.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn new(bytes: Vec<u8>) -> anyhow::Result<ClusterSecret> {
        anyhow::ensure!(bytes.len() >= MIN_SECRET, "the cluster secret is {} bytes; use at least {MIN_SECRET}", bytes.len());
        Ok(ClusterSecret(bytes))
    }

    /// From `file` (whitespace trimmed) or else `KVRAIL_CLUSTER_SECRET`.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Option<ClusterSecret>> {
        if let Some(f) = file {
            let text = std::fs::read(f).map_err(|e| anyhow::anyhow!("reading cluster secret file {}: {e}", f.display()))?;
            return Ok(Some(ClusterSecret::new(text.trim_ascii().to_vec())?));
        }
        match std::env::var(SECRET_VAR) {
            Ok(v) => Ok(Some(ClusterSecret::new(v.trim().as_bytes().to_vec())?)),
            Err(_) => Ok(None),
        }
    }

    fn mac(&self, role: &str, nonce: &[u8], info: &pb::AgentInfo) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        let region = info.region.clone().unwrap_or_default();
        for part in [b"kvrail/v1".as_slice(), role.as_bytes(), nonce, info.agent_id.as_bytes(), &info.worker_address, &region.rkey] {
            m.update(&(part.len() as u64).to_le_bytes());
            m.update(part);
        }
        m.update(&region.base.to_le_bytes());
        m.update(&region.length.to_le_bytes());
        m.update(&info.compat_hash.to_le_bytes());
        m.update(&info.role.to_le_bytes());
        m
    }

    /// The proof `role` presents with `info` for `nonce`.
    pub fn prove(&self, role: &str, nonce: &[u8], info: &pb::AgentInfo) -> Vec<u8> {
        self.mac(role, nonce, info).finalize().into_bytes().to_vec()
    }

    /// Constant-time check of a peer's proof.
    pub fn check(&self, role: &str, nonce: &[u8], info: &pb::AgentInfo, proof: &[u8]) -> bool {
        self.mac(role, nonce, info).verify_slice(proof).is_ok()
    }
}

/// One-time nonces handed out by a decode agent.
#[derive(Debug, Default)]
pub struct Nonces {
    issued: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl Nonces {
    pub fn issue(&self) -> Vec<u8> {
        let nonce: [u8; 32] = rand::random();
        let mut g = self.issued.lock().expect("lock");
        g.retain(|_, t| t.elapsed() < NONCE_TTL);
        if g.len() >= MAX_NONCES {
            if let Some(oldest) = g.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                g.remove(&oldest);
            }
        }
        g.insert(nonce.to_vec(), Instant::now());
        nonce.to_vec()
    }

    /// Consumes `nonce`; true if it was issued and has not expired.
    pub fn take(&self, nonce: &[u8]) -> bool {
        self.issued.lock().expect("lock").remove(nonce).is_some_and(|t| t.elapsed() < NONCE_TTL)
    }
}

/// A random secret for agents a driver (demo, bench, soak, tests) starts:
/// the same for every agent of this process, unless the environment names one.
pub fn driver_secret() -> String {
    static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    S.get_or_init(|| std::env::var(SECRET_VAR).unwrap_or_else(|_| (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> pb::AgentInfo {
        pb::AgentInfo {
            agent_id: id.into(),
            worker_address: vec![1, 2],
            region: Some(pb::RegionInfo { base: 4096, length: 1 << 20, rkey: vec![7] }),
            ..Default::default()
        }
    }

    #[test]
    fn proofs_bind_secret_role_nonce_and_info() {
        let s = ClusterSecret::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = ClusterSecret::new(b"fedcba9876543210".to_vec()).unwrap();
        let p = s.prove("prefill", b"n1", &info("a"));
        assert!(s.check("prefill", b"n1", &info("a"), &p));
        assert!(!other.check("prefill", b"n1", &info("a"), &p));
        assert!(!s.check("decode", b"n1", &info("a"), &p));
        assert!(!s.check("prefill", b"n2", &info("a"), &p));
        assert!(!s.check("prefill", b"n1", &info("b"), &p));
        let mut moved = info("a");
        moved.region.as_mut().unwrap().base += 1;
        assert!(!s.check("prefill", b"n1", &moved, &p));
        assert!(!s.check("prefill", b"n1", &info("a"), &[]));
    }

    #[test]
    fn short_secrets_are_refused_and_nonces_are_single_use() {
        assert!(ClusterSecret::new(b"short".to_vec()).is_err());
        let n = Nonces::default();
        let a = n.issue();
        assert!(n.take(&a));
        assert!(!n.take(&a));
        assert!(!n.take(b"never issued"));
        assert_eq!(format!("{:?}", ClusterSecret::new(vec![b'x'; 16]).unwrap()), "ClusterSecret(..)");
    }
}
