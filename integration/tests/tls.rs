//! gRPC over mutual TLS: agents with certificates from the cluster CA
//! handshake and move verified blocks; a client without TLS, or with a
//! certificate from another CA, is refused; the decode agent keeps serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvrail_agent::tls::{endpoint, TlsArgs};
use kvrail_integration::{kvrail_bin, verified_transfer, AgentProcess};
use kvrail_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A CA and leaf certificates for 127.0.0.1, written as PEM files.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("kvrail-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Pki { dir }
    }

    /// Writes `<name>-ca.pem` and returns the CA's issuer.
    fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.dir.join(format!("{name}-ca.pem")), cert.pem()).unwrap();
        Issuer::new(params, key)
    }

    /// Writes `<name>.pem` / `<name>.key`, valid for 127.0.0.1 and `kvrail.test`.
    fn leaf(&self, name: &str, ca: &Issuer<'static, KeyPair>) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "kvrail.test".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn flags(&self, leaf: &str, ca: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{leaf}.pem")),
            "--tls-key".into(),
            self.path(&format!("{leaf}.key")),
            "--tls-ca".into(),
            self.path(&format!("{ca}-ca.pem")),
        ]
    }

    fn args(&self, leaf: &str, ca: &str) -> TlsArgs {
        let p = |f: String| Some(Path::new(&self.path(&f)).to_path_buf());
        TlsArgs {
            tls_cert: p(format!("{leaf}.pem")),
            tls_key: p(format!("{leaf}.key")),
            tls_ca: p(format!("{ca}-ca.pem")),
            tls_server_name: None,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent_args(role: &str, id: &str, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> =
        [role, "--agent-id", id, "--transport", "sm", "--region-bytes", "64MiB", "--block-bytes", "64KiB", "--test-patterns"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    a.extend_from_slice(extra);
    a
}

async fn control_info(addr: &str, tls: Option<&kvrail_agent::tls::Tls>) -> anyhow::Result<pb::InfoResponse> {
    let channel = endpoint(addr, tls)?.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5)).connect().await?;
    Ok(pb::control_client::ControlClient::new(channel).info(pb::InfoRequest {}).await?.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_moves_verified_blocks_and_refuses_strangers() {
    let pki = Pki::new("mtls");
    let cluster = pki.ca("cluster");
    pki.leaf("decode", &cluster);
    pki.leaf("prefill", &cluster);
    let rogue = pki.ca("rogue");
    pki.leaf("stranger", &rogue);
    let limit = Duration::from_secs(60);

    let mut decode_flags = pki.flags("decode", "cluster");
    decode_flags.extend(["--local-socket".into(), pki.path("decode.sock")]);
    let mut decode = AgentProcess::spawn_exe(&kvrail_bin(), &agent_args("decode", "tls-decode", &decode_flags), false, limit)
        .await
        .expect("decode agent with TLS");
    assert_eq!(decode.ready["tls"], true, "{}", decode.ready);

    // A prefill agent whose certificate comes from another CA is refused
    // at once (not retried for minutes), and says why.
    let t0 = Instant::now();
    let mut stranger = pki.flags("stranger", "rogue");
    stranger.extend(["--peer".into(), decode.listen.clone()]);
    let args = agent_args("prefill", "tls-stranger", &stranger);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let secret = kvrail_agent::agent::auth::driver_secret();
    let out = kvrail_integration::run_kvrail_env(&args, &[(kvrail_agent::agent::auth::SECRET_VAR, &secret)], limit);
    assert!(!out.status.success(), "a prefill agent with a foreign certificate was accepted");
    assert!(t0.elapsed() < Duration::from_secs(30), "refusal took {:?}", t0.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the handshake") && err.to_lowercase().contains("certificate"), "{err}");

    // Control clients over TCP: cluster identity yes; plain HTTP/2 and a
    // foreign certificate no.
    let ours = pki.args("prefill", "cluster").load().unwrap().unwrap();
    let info = control_info(&decode.listen, Some(&ours)).await.expect("TLS client with a cluster certificate");
    assert_eq!(info.agent.unwrap().agent_id, "tls-decode");
    assert!(control_info(&decode.listen, None).await.is_err(), "plain HTTP/2 reached a TLS-only port");
    let foreign = pki.args("stranger", "rogue").load().unwrap().unwrap();
    assert!(control_info(&decode.listen, Some(&foreign)).await.is_err(), "a foreign certificate was accepted");
    // With the server-name override the same CA still has to sign it.
    let mut named = pki.args("prefill", "cluster");
    named.tls_server_name = Some("kvrail.test".into());
    control_info(&decode.listen, Some(&named.load().unwrap().unwrap())).await.expect("server name from --tls-server-name");

    // The good prefill agent handshakes over TLS and moves verified blocks.
    let mut good = pki.flags("prefill", "cluster");
    good.extend(["--peer".into(), decode.listen.clone(), "--local-socket".into(), pki.path("prefill.sock")]);
    let mut prefill = AgentProcess::spawn_exe(&kvrail_bin(), &agent_args("prefill", "tls-prefill", &good), false, limit)
        .await
        .expect("prefill agent with a cluster certificate");
    assert_eq!(prefill.ready["tls"], true);
    assert!(prefill.ready["handshake_ms"].as_f64().unwrap() > 0.0);
    verified_transfer(&mut decode, &mut prefill, "over-tls").await;
    prefill.stop().await;
    decode.stop().await;
}

#[test]
fn tls_flags_come_together_and_files_must_be_pem() {
    let out = kvrail_integration::run_kvrail(&["decode", "--tls-cert", "/nonexistent.pem"], Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key") && err.contains("--tls-ca"), "{err}");

    let pki = Pki::new("pem");
    std::fs::write(pki.dir.join("junk.pem"), "not a certificate").unwrap();
    std::fs::write(pki.dir.join("junk.key"), "not a key").unwrap();
    std::fs::write(pki.dir.join("junk-ca.pem"), "not a CA").unwrap();
    let mut args = vec!["decode".to_string(), "--insecure-no-auth".into()];
    args.extend(pki.flags("junk", "junk"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kvrail_integration::run_kvrail(&args, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not PEM"), "{err}");
}
