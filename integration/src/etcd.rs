//! A real etcd server for the registry tests: Debian's `etcd` on loopback,
//! on free ports, with its data in a temporary folder; killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member serving clients on `host:client_port`.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// The address it serves on: loopback, or a test's own bridge.
    pub host: String,
    pub client_port: u16,
    peer_port: u16,
    pub data_dir: PathBuf,
    log: PathBuf,
}

/// A port that was free a moment ago (bound on loopback, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("port").port()
}

impl EtcdServer {
    /// Starts etcd on fresh ports with a fresh data folder named after `tag`.
    pub fn start(tag: &str) -> EtcdServer {
        Self::start_on(tag, free_port())
    }

    /// Starts etcd serving clients on `client_port`.
    pub fn start_on(tag: &str, client_port: u16) -> EtcdServer {
        Self::start_at(tag, "127.0.0.1", client_port)
    }

    /// Starts etcd serving clients on `host:client_port` (`host` one of
    /// this machine's addresses: loopback or a test's own interface).
    pub fn start_at(tag: &str, host: &str, client_port: u16) -> EtcdServer {
        let data_dir = std::env::temp_dir().join(format!("kvrail-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let (log, peer_port, host) = (data_dir.with_extension("log"), free_port(), host.to_string());
        let mut s = EtcdServer { child: None, host, client_port, peer_port, log, data_dir };
        s.restart();
        s
    }

    /// `etcd://HOST:PORT/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}:{}/{prefix}", self.host, self.client_port)
    }

    /// Starts (again) on the same ports and data folder; waits until it
    /// answers (at most 20 s).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let client = format!("http://{}:{}", self.host, self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "kvrail-test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("kvrail-test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (Debian's etcd-server; scripts/setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &client, "--command-timeout=1s", "endpoint", "health"])
                .output()
                .expect("run etcdctl (Debian's etcd-client)");
            if out.status.success() {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("etcd exited ({st}) before answering; its log: {}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 20 s; its log: {}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills etcd at once (SIGKILL), keeping its data folder.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}
