//! TLS for the gRPC channel (rustls): every agent holds a certificate and
//! key signed by the cluster's CA and trusts only that CA, in both
//! directions (mutual TLS). The agent's TCP port then speaks TLS only; the
//! owner-only Unix socket of the local API stays plain.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// `--tls-*` flags, shared by the agents and the drivers that dial them.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents; with --tls-key and
    /// --tls-ca, turns TLS on for every gRPC connection it serves or dials.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Name the peer's certificate must carry (default: the host of the
    /// address dialled, an IP address or a DNS name).
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

/// Loaded TLS material, ready for the server and for clients.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
    server_name: Option<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the TLS {what} {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&pem).contains("-----BEGIN "),
        "the TLS {what} {} is not PEM (no -----BEGIN line)",
        path.display()
    );
    Ok(pem)
}

impl TlsArgs {
    /// The same flags for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let files = [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key), ("--tls-ca", &self.tls_ca)];
        let mut v: Vec<String> =
            files.iter().filter_map(|(k, f)| Some([k.to_string(), f.as_ref()?.display().to_string()])).flatten().collect();
        v.extend(self.tls_server_name.iter().flat_map(|n| ["--tls-server-name".to_string(), n.clone()]));
        v
    }

    /// `None` when no `--tls-*` flag is given (plain HTTP/2).
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            return Ok(None);
        };
        Ok(Some(Tls {
            identity: Identity::from_pem(read(cert, "certificate")?, read(key, "key")?),
            ca: Certificate::from_pem(read(ca, "CA certificate")?),
            server_name: self.tls_server_name.clone(),
        }))
    }
}

impl Tls {
    /// Server side: present our certificate, require a client certificate
    /// from the cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    fn client(&self, host: &str) -> ClientTlsConfig {
        let name = self.server_name.clone().unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string());
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone()).domain_name(name)
    }
}

/// An endpoint for `addr` (`host:port` or a URL), over TLS when `tls` is set.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> anyhow::Result<Endpoint> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = Endpoint::from_shared(format!("{scheme}://{rest}"))?.tcp_nodelay(true);
    let Some(tls) = tls else { return Ok(ep) };
    let host = ep.uri().host().context("the peer address has no host")?.to_string();
    ep.tls_config(tls.client(&host)).context("TLS client configuration")
}

/// True when `e` was caused by a TLS failure (certificate not trusted,
/// wrong name, peer refused ours, peer not speaking TLS): configuration
/// errors that a retry cannot fix.
pub fn is_tls_refusal(e: &anyhow::Error) -> bool {
    // `chain` already walks every `source()`; an io::Error carries rustls'
    // error as its payload rather than as its source.
    e.chain().any(|err| {
        err.is::<rustls::Error>()
            || err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).is_some_and(|inner| inner.is::<rustls::Error>())
    })
}
