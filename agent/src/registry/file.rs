//! `--peers FILE`: the registry of a cluster without etcd. One JSON object
//! per line with an entry's fields (blank lines and `#` comments allowed):
//!
//! ```text
//! {"agent_id":"decode-0","role":"decode","address":"10.0.0.2:7000","rank":0,"host":"n2","memory":"host","protocol_version":4}
//! ```

use std::path::{Path, PathBuf};

use super::{Entry, RegistryError};

/// The entries of a peers file, checked when it was read.
#[derive(Debug, Clone)]
pub struct StaticPeers {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl StaticPeers {
    /// Reads and checks `path`; the first bad line fails the whole file.
    pub fn load(path: &Path) -> anyhow::Result<StaticPeers> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading peers file {}: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> anyhow::Result<StaticPeers> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("peers file {} line {}", path.display(), i + 1);
            let e = Entry::parse(line.as_bytes(), None).map_err(|r| {
                anyhow::anyhow!(
                    "{}: {r} (one JSON object per line with agent_id, role, address, host, memory, protocol_version; rank optional)",
                    at()
                )
            })?;
            if entries.iter().any(|x| x.agent_id == e.agent_id) {
                anyhow::bail!("{}: agent `{}` is listed twice", at(), e.agent_id);
            }
            entries.push(e);
        }
        Ok(StaticPeers { path: path.to_path_buf(), entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn resolve(&self, agent_id: &str) -> Result<Entry, RegistryError> {
        self.entries
            .iter()
            .find(|e| e.agent_id == agent_id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound { id: agent_id.into(), source_name: self.path.display().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"agent_id":"d0","role":"decode","address":"127.0.0.1:7000","host":"n1","memory":"host","protocol_version":PV}"#;

    fn line(id: &str) -> String {
        LINE.replace("d0", id).replace("PV", &kvrail_proto::PROTOCOL_VERSION.to_string())
    }

    #[test]
    fn a_peers_file_lists_its_entries_and_a_bad_line_is_named() {
        let p = Path::new("peers.jsonl");
        let text = format!("# decode agents\n{}\n\n{}\n", line("d0"), line("d1"));
        let s = StaticPeers::parse(p, &text).unwrap();
        assert_eq!(s.entries().len(), 2);
        assert_eq!(s.resolve("d1").unwrap().address, "127.0.0.1:7000");
        assert!(s.resolve("d2").unwrap_err().to_string().contains("`d2` is not registered in peers.jsonl"));
        let dup = format!("{}\n{}\n", line("d0"), line("d0"));
        let e = StaticPeers::parse(p, &dup).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("listed twice"), "{e}");
        let bad = format!("{}\n{{\"agent_id\": \"d1\"\n", line("d0"));
        let e = StaticPeers::parse(p, &bad).unwrap_err().to_string();
        assert!(e.starts_with("peers file peers.jsonl line 2: not a registry entry") && e.contains("one JSON object per line"), "{e}");
        let old = line("d0").replace(&format!(":{}}}", kvrail_proto::PROTOCOL_VERSION), ":1}");
        let e = StaticPeers::parse(p, &old).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("speaks protocol v1"), "{e}");
        let e = StaticPeers::load(Path::new("/nonexistent/peers")).unwrap_err().to_string();
        assert!(e.contains("reading peers file /nonexistent/peers"), "{e}");
    }
}
