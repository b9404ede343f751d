//! Which UCX transports an agent uses.

use std::fmt;
use std::str::FromStr;

/// `--transport`: what UCX may use to reach peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// UCX picks (RDMA on a cluster, shared memory or TCP elsewhere).
    #[default]
    Auto,
    /// Shared memory only (posix, sysv): same host. Not cma: UCX serves
    /// RMA over cma with process_vm_readv/writev on the peer process, and
    /// when the peer has died UCX aborts the caller (`ucs_fatal` in
    /// cma_ep.c, seen with UCX 1.18.1); over posix and sysv it copies
    /// through a mapping that outlives the peer.
    Sm,
    /// TCP only.
    Tcp,
}

impl Transport {
    /// The `UCX_TLS` value, or `None` to leave UCX's default.
    pub fn ucx_tls(self) -> Option<&'static str> {
        match self {
            Transport::Auto => None,
            Transport::Sm => Some("posix,sysv,self"),
            Transport::Tcp => Some("tcp"),
        }
    }

    /// The UCX configuration for this transport (names without `UCX_`),
    /// applied on top of the environment. `uct_assertions`: the loaded
    /// libuct was built with assertions ([`crate::ucx_facts::uct_has_assertions`]).
    /// Such a build aborts a tcp sender whose peer dies in the middle of a
    /// zero-copy send, so there tcp sends by copy: every message goes out of
    /// one 64 KiB send buffer (tcp's `TX_SEG_SIZE`; a delivery chunk fits in
    /// one), never from the region itself. It costs a copy per byte sent;
    /// it keeps the prefill agent alive when a decode agent dies.
    pub fn ucx_settings(self, uct_assertions: bool) -> Vec<(&'static str, &'static str)> {
        let mut settings: Vec<_> = self.ucx_tls().map(|t| ("TLS", t)).into_iter().collect();
        if self == Transport::Tcp && uct_assertions {
            settings.extend([("ZCOPY_THRESH", "inf"), ("TX_SEG_SIZE", "64kb")]);
        }
        settings
    }

    /// [`Transport::ucx_settings`] for a region in GPU memory: the
    /// transports that reach device memory join the list (`cuda_copy` moves
    /// between host and device, `cuda_ipc` between processes on one host,
    /// `gdr_copy` reads and writes it from the CPU through a BAR mapping).
    /// `auto` leaves UCX's default, which has them all.
    pub fn ucx_settings_for_gpu(self, uct_assertions: bool) -> Vec<(&'static str, &'static str)> {
        let mut settings = self.ucx_settings(uct_assertions);
        for (name, value) in &mut settings {
            if *name == "TLS" {
                *value = match self {
                    Transport::Sm => "posix,sysv,self,cuda_copy,cuda_ipc,gdr_copy",
                    Transport::Tcp => "tcp,cuda_copy,gdr_copy",
                    Transport::Auto => value,
                };
            }
        }
        settings
    }

    /// Whether writes to a peer go as active messages instead of RMA puts.
    /// Over tcp UCX emulates puts in software, and the target of an emulated
    /// put whose writer dies can be aborted inside UCX; active messages
    /// never make the receiver answer. Elsewhere (shared memory, RDMA) puts
    /// are one-sided.
    pub fn writes_as_messages(self) -> bool {
        self == Transport::Tcp
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
        assert_eq!("SM".parse::<Transport>().unwrap().ucx_tls(), Some("posix,sysv,self"));
        assert_eq!("tcp".parse::<Transport>().unwrap().ucx_tls(), Some("tcp"));
        assert_eq!("auto".parse::<Transport>().unwrap().ucx_tls(), None);
        assert_eq!(Transport::Tcp.ucx_settings(false), [("TLS", "tcp")]);
        assert_eq!(Transport::Tcp.ucx_settings(true), [("TLS", "tcp"), ("ZCOPY_THRESH", "inf"), ("TX_SEG_SIZE", "64kb")]);
        assert_eq!(Transport::Sm.ucx_settings(true), [("TLS", "posix,sysv,self")]);
        assert_eq!(Transport::Sm.ucx_settings_for_gpu(true), [("TLS", "posix,sysv,self,cuda_copy,cuda_ipc,gdr_copy")]);
        assert_eq!(
            Transport::Tcp.ucx_settings_for_gpu(true),
            [("TLS", "tcp,cuda_copy,gdr_copy"), ("ZCOPY_THRESH", "inf"), ("TX_SEG_SIZE", "64kb")]
        );
        assert!(Transport::Auto.ucx_settings_for_gpu(false).is_empty());
        assert!(Transport::Auto.ucx_settings(true).is_empty());
        assert!("rdma".parse::<Transport>().unwrap_err().contains("auto, sm or tcp"));
    }
}
