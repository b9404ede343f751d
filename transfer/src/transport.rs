//! Which UCX transports an agent uses.

use std::fmt;
use std::str::FromStr;

/// `--transport`: what UCX may use to reach peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// UCX picks (RDMA on a cluster, shared memory or TCP elsewhere).
    #[default]
    Auto,
    /// Shared memory only (posix, sysv, cma): same host.
    Sm,
    /// TCP only.
    Tcp,
}

impl Transport {
    /// The `UCX_TLS` value, or `None` to leave UCX's default.
    pub fn ucx_tls(self) -> Option<&'static str> {
        match self {
            Transport::Auto => None,
            Transport::Sm => Some("sm"),
            Transport::Tcp => Some("tcp"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Sm => "sm",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Transport::Auto),
            "sm" | "shm" => Ok(Transport::Sm),
            "tcp" => Ok(Transport::Tcp),
            other => Err(format!("unknown transport {other:?}: expected auto, sm or tcp")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_map() {
        assert_eq!("SM".parse::<Transport>().unwrap().ucx_tls(), Some("sm"));
        assert_eq!("tcp".parse::<Transport>().unwrap().ucx_tls(), Some("tcp"));
        assert_eq!("auto".parse::<Transport>().unwrap().ucx_tls(), None);
        assert!("rdma".parse::<Transport>().unwrap_err().contains("auto, sm or tcp"));
    }
}
