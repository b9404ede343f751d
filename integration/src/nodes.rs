//! Simulated nodes: one network namespace per node, each with a veth whose
//! other end is on one bridge in this (the root) namespace, which holds the
//! bridge's address (the "head node": etcd and the drivers run there). The
//! test makes them and removes them when dropped; it needs root and
//! iproute2.

use std::process::Command;

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    /// Its network namespace.
    pub ns: String,
    /// Its interface (inside `ns`), for `UCX_NET_DEVICES`.
    pub dev: String,
    /// Its address on the bridge.
    pub ip: String,
}

/// Nodes on one bridge.
#[derive(Debug)]
pub struct Nodes {
    bridge: String,
    /// The bridge's own address (root namespace).
    pub head: String,
    pub nodes: Vec<Node>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

impl Nodes {
    /// `n` nodes (at most 200) on a fresh bridge; panics with the failing
    /// command if the namespaces cannot be made (no root, no iproute2).
    pub fn new(n: usize) -> Nodes {
        assert!(n <= 200, "at most 200 nodes on one /24");
        let id = std::process::id() % 100_000;
        let net = format!("10.233.{}", std::process::id() % 200 + 20);
        let mut nodes = Nodes { bridge: format!("kvbr{id}"), head: format!("{net}.1"), nodes: Vec::new() };
        if let Err(e) = nodes.build(id, &net, n) {
            panic!("cannot make {n} simulated nodes (needs root and iproute2): {e}");
        }
        nodes
    }

    fn build(&mut self, id: u32, net: &str, n: usize) -> Result<(), String> {
        let br = self.bridge.clone();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", self.head), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..n {
            let (ns, host_end, dev) = (format!("kvn{id}-{i}"), format!("kvh{id}-{i}"), format!("kve{i}"));
            let addr = format!("{net}.{}", 10 + i);
            ip(&["netns", "add", &ns])?;
            self.nodes.push(Node { ns: ns.clone(), dev: dev.clone(), ip: addr.clone() });
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &dev])?;
            ip(&["link", "set", &dev, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", &br])?;
            ip(&["link", "set", &host_end, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &dev])?;
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// `ip netns exec NS env UCX_NET_DEVICES=DEV EXE ARGS...`: the command
    /// line that runs `exe` on node `i` (the program is `ip`).
    pub fn exec_args(&self, i: usize, exe: &std::path::Path, args: &[String]) -> Vec<String> {
        let n = &self.nodes[i];
        let mut v: Vec<String> = vec!["netns".into(), "exec".into(), n.ns.clone(), "env".into(), format!("UCX_NET_DEVICES={}", n.dev)];
        v.push(exe.display().to_string());
        v.extend(args.iter().cloned());
        v
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth, and with it the bridge's end.
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
