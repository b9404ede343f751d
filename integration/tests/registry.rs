//! Discovery through a real etcd (Debian's etcd-server on loopback, free
//! ports, a temporary data folder): agents publish themselves under a lease,
//! are resolved by id and role, leave within their TTL when killed, bad or
//! forged entries are refused, and etcd down at start or lost while running
//! is handled as the README says.

use std::time::{Duration, Instant};

use kvrail_agent::agent::Role;
use kvrail_agent::registry::{Entry, Gone, Registry, RegistryError, RegistryUrl};
use kvrail_integration::etcd::{free_port, EtcdServer};
use kvrail_integration::{kvrail_bin, run_kvrail, run_kvrail_env, verified_transfer, AgentProcess};

const READY: Duration = Duration::from_secs(60);

/// `decode`/`prefill` flags of a small agent registered at `url` with `ttl`.
fn agent_args(role: &str, id: &str, url: &str, ttl: &str) -> Vec<String> {
    [
        role,
        "--agent-id",
        id,
        "--transport",
        "tcp",
        "--region-bytes",
        "16MiB",
        "--block-bytes",
        "16KiB",
        "--test-patterns",
        "--registry",
        url,
        "--registry-ttl",
        ttl,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn spawn(args: Vec<String>) -> AgentProcess {
    AgentProcess::spawn_exe(&kvrail_bin(), &args, false, READY).await.expect("agent starts")
}

async fn registry(url: &str) -> Registry {
    let u: RegistryUrl = url.parse().unwrap();
    Registry::open(Some(&u), None).await.unwrap().expect("a registry")
}

/// An etcd client of the test's own, to forge and inspect keys.
async fn etcd_client(etcd: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([format!("http://127.0.0.1:{}", etcd.client_port)], None).await.unwrap()
}

/// The lease the key of `id` is bound to (0: none; None: no key).
async fn lease_of(etcd: &EtcdServer, prefix: &str, id: &str) -> Option<i64> {
    let mut c = etcd_client(etcd).await;
    let r = c.get(format!("/{prefix}/agents/{id}"), None).await.unwrap();
    r.kvs().first().map(|kv| kv.lease())
}

/// Polls `reg.resolve(id)` until it succeeds (or `limit` passes).
async fn resolved_within(reg: &Registry, id: &str, limit: Duration) -> Result<Entry, RegistryError> {
    let deadline = Instant::now() + limit;
    loop {
        match reg.resolve(id).await {
            Ok(e) => return Ok(e),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `kvrail:` lines of a failed command's stderr: exactly one, returned.
fn one_error_line(stderr: &[u8]) -> String {
    let s = text(stderr);
    let lines: Vec<&str> = s.lines().filter(|l| l.starts_with("kvrail:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{s}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_publish_themselves_and_are_found_by_id_and_role() {
    let etcd = EtcdServer::start("publish");
    let url = etcd.url("pub");
    let mut d0a = agent_args("decode", "d0", &url, "2s");
    d0a.extend(["--rank".into(), "0".into()]);
    let d0 = spawn(d0a).await;
    let d1 = spawn(agent_args("decode", "d1", &url, "30s")).await;
    let mut pa = agent_args("prefill", "p0", &url, "2s");
    pa.extend(["--peer".into(), d0.listen.clone()]);
    let p0 = spawn(pa).await;
    assert_eq!(d0.ready["registry"], url, "{}", d0.ready);

    let reg = registry(&url).await;
    let e = reg.resolve("d0").await.unwrap();
    assert_eq!((e.address.as_str(), e.role.as_str(), e.rank, e.memory.as_str()), (d0.listen.as_str(), "decode", Some(0), "host"));
    assert_eq!(e.protocol_version, kvrail_proto::PROTOCOL_VERSION);
    assert!(e.epoch > 0);
    let ids = |l: &kvrail_agent::registry::Listing| l.entries.iter().map(|e| e.agent_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&reg.list(Some(Role::Decode)).await.unwrap()), ["d0", "d1"]);
    assert_eq!(ids(&reg.list(Some(Role::Prefill)).await.unwrap()), ["p0"]);
    assert_eq!(reg.resolve("p0").await.unwrap().address, p0.listen);
    let missing = reg.resolve("d9").await.unwrap_err().to_string();
    assert_eq!(missing, format!("agent `d9` is not registered in {url}"));

    // The CLI: one line per agent, or one JSON object per line.
    let out = run_kvrail(&["peers", "--registry", &url], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    for (id, addr) in [("d0", &d0.listen), ("d1", &d1.listen), ("p0", &p0.listen)] {
        assert!(listed.lines().any(|l| l.contains(&format!(" {id} ")) && l.contains(addr.as_str())), "{id} {addr}:\n{listed}");
    }
    let out = run_kvrail(&["peers", "--registry", &url, "--role", "prefill", "--json"], Duration::from_secs(30));
    let lines: Vec<Entry> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, [reg.resolve("p0").await.unwrap()]);

    // An orderly stop withdraws the key at once, well inside d1's 30 s lease.
    let stopped = Instant::now();
    d1.stop().await;
    let gone = reg.resolve("d1").await.unwrap_err();
    assert!(matches!(gone, RegistryError::NotFound { .. }), "{gone}");
    assert!(stopped.elapsed() < Duration::from_secs(10));
    p0.stop().await;
    d0.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_sigkill_leaves_the_registry_within_its_ttl() {
    let etcd = EtcdServer::start("sigkill");
    let url = etcd.url("kill");
    let mut d0 = spawn(agent_args("decode", "d0", &url, "2s")).await;
    let reg = registry(&url).await;
    let entry = reg.resolve("d0").await.unwrap();
    let watch = {
        let (reg, entry) = (reg.clone(), entry.clone());
        tokio::spawn(async move { reg.gone(&entry).await })
    };
    // Renewed all along: still there after several TTLs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!watch.is_finished(), "a live agent's entry was reported gone");
    assert_eq!(reg.resolve("d0").await.unwrap(), entry);
    d0.kill().await;
    let killed = Instant::now();
    // TTL 2 s, plus etcd's expiry check (every 0.5 s) and slack.
    let gone = tokio::time::timeout(Duration::from_secs(5), watch).await.expect("gone within TTL + 3 s").unwrap();
    assert_eq!(gone, Gone::Vanished { agent_id: "d0".into() });
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(5), "{took:?}");
    assert!(gone.to_string().contains("peer `d0` left the registry"), "{gone}");
    assert!(matches!(reg.resolve("d0").await, Err(RegistryError::NotFound { .. })));
    eprintln!("killed agent left the registry after {took:?} (TTL 2 s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_refused_by_name_and_skipped_when_listed() {
    let etcd = EtcdServer::start("bad");
    let url = etcd.url("bad");
    let good = Entry {
        agent_id: "good".into(),
        role: "decode".into(),
        address: "127.0.0.1:7000".into(),
        rank: None,
        host: "h".into(),
        memory: "host".into(),
        protocol_version: kvrail_proto::PROTOCOL_VERSION,
        epoch: 1,
    };
    let forged = [
        ("old", Entry { agent_id: "old".into(), protocol_version: 3, ..good.clone() }.to_json()),
        ("nowhere", Entry { agent_id: "nowhere".into(), address: "nowhere".into(), ..good.clone() }.to_json()),
        ("liar", Entry { agent_id: "someone-else".into(), ..good.clone() }.to_json()),
        ("junk", "not json".to_string()),
        ("good", good.to_json()),
    ];
    let mut c = etcd_client(&etcd).await;
    for (id, value) in &forged {
        c.put(format!("/bad/agents/{id}"), value.as_str(), None).await.unwrap();
    }
    let v = kvrail_proto::PROTOCOL_VERSION;
    for (id, says) in [
        ("old", format!("registry entry /bad/agents/old refused: agent `old` speaks protocol v3, this kvrail speaks v{v}: upgrade one of them")),
        (
            "nowhere",
            "registry entry /bad/agents/nowhere refused: agent `nowhere` gives address `nowhere`, which is not host:port with a non-zero port"
                .into(),
        ),
        ("liar", "registry entry /bad/agents/liar refused: the key names agent `liar` but the entry says `someone-else`".into()),
        ("junk", "registry entry /bad/agents/junk refused: not a registry entry (expected ident".into()),
    ] {
        let out = run_kvrail(&["peers", "--registry", &url, "--id", id], Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "{id}");
        assert!(out.stdout.is_empty(), "{id}: {}", text(&out.stdout));
        let line = one_error_line(&out.stderr);
        assert!(line.starts_with(&format!("kvrail: {says}")), "{id}: {line}");
    }
    let out = run_kvrail(&["peers", "--registry", &url], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains(" good ") && listed.contains("127.0.0.1:7000"), "{listed}");
    let err = text(&out.stderr);
    for id in ["old", "nowhere", "liar", "junk"] {
        assert!(err.contains(&format!("kvrail: skipped registry entry /bad/agents/{id}: ")), "{id}:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_entry_yields_an_address_and_never_access() {
    // An impostor without the cluster secret registers itself as a decode
    // agent. Resolving it gives only its address; a prefill agent that
    // dials it is refused at the handshake, which the secret decides.
    let etcd = EtcdServer::start("forged");
    let url = etcd.url("forged");
    let real = spawn(agent_args("decode", "d-real", &url, "5s")).await;
    let env = vec![(kvrail_agent::agent::auth::SECRET_VAR.to_string(), Some("the-impostors-own-secret".to_string()))];
    let impostor = AgentProcess::spawn_env(&kvrail_bin(), &agent_args("decode", "d-forged", &url, "5s"), &env, false, READY).await.unwrap();
    let out = run_kvrail(&["peers", "--registry", &url, "--id", "d-forged", "--json"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let e: Entry = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e.address, impostor.listen);
    let secret = kvrail_agent::agent::auth::driver_secret();
    let mut args = agent_args("prefill", "p0", &url, "5s");
    args.extend(["--peer".into(), e.address.clone()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_kvrail_env(&argv, &[(kvrail_agent::agent::auth::SECRET_VAR, &secret)], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let line = one_error_line(&out.stderr);
    assert!(line.contains("refused the handshake") && line.contains("cluster secret"), "{line}");
    // The real agent, resolved the same way, admits the same prefill agent.
    let d = registry(&url).await.resolve("d-real").await.unwrap();
    let mut args = agent_args("prefill", "p1", &url, "5s");
    args.extend(["--peer".into(), d.address]);
    let p1 = spawn(args).await;
    assert!(p1.ready["handshake_ms"].as_f64().is_some(), "{}", p1.ready);
    p1.stop().await;
    impostor.stop().await;
    real.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_is_one_line_or_the_peers_file_stands_in() {
    let port = free_port();
    let url = format!("etcd://127.0.0.1:{port}/down");
    let secret = kvrail_agent::agent::auth::driver_secret();
    let env = [(kvrail_agent::agent::auth::SECRET_VAR, secret.as_str())];
    let args = agent_args("decode", "d0", &url, "2s");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = run_kvrail_env(&argv, &env, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let line = one_error_line(&out.stderr);
    assert!(line.starts_with(&format!("kvrail: registry {url} unreachable: ")), "{line}");
    assert!(line.contains("connection refused") && line.ends_with("; or give --peers FILE to start from a static list"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());

    // With a peers file the agent starts, lookups use the file, and the
    // agent publishes itself once etcd answers.
    let dir = std::env::temp_dir().join(format!("kvrail-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("peers.jsonl");
    let v = kvrail_proto::PROTOCOL_VERSION;
    let line = format!(
        r#"{{"agent_id":"p-static","role":"prefill","address":"127.0.0.1:7001","host":"h","memory":"host","protocol_version":{v}}}"#
    );
    std::fs::write(&file, format!("# static peers\n{line}\n")).unwrap();
    let mut args = agent_args("decode", "d0", &url, "2s");
    args.extend(["--peers".into(), file.display().to_string()]);
    let d0 = spawn(args).await;
    let peers = ["peers", "--registry", &url, "--peers", file.to_str().unwrap()];
    let out = run_kvrail(&peers, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(" p-static ") && text(&out.stdout).lines().count() == 1, "{}", text(&out.stdout));
    let etcd = EtcdServer::start_on("late", port);
    let reg = registry(&url).await;
    let e = resolved_within(&reg, "d0", Duration::from_secs(10)).await.expect("published once etcd answers");
    assert_eq!(e.address, d0.listen);
    let out = run_kvrail(&peers, Duration::from_secs(30));
    assert_eq!(text(&out.stdout).lines().count(), 2, "{}", text(&out.stdout));
    d0.stop().await;
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lost_while_running_sessions_keep_working_and_the_key_returns() {
    let mut etcd = EtcdServer::start("lost");
    let url = etcd.url("lost");
    let mut decode = spawn(agent_args("decode", "d0", &url, "2s")).await;
    let mut pa = agent_args("prefill", "p0", &url, "2s");
    pa.extend(["--peer".into(), decode.listen.clone()]);
    let mut prefill = spawn(pa).await;
    let reg = registry(&url).await;
    let entry = reg.resolve("d0").await.unwrap();
    let lease_before = lease_of(&etcd, "lost", "d0").await.expect("d0's key");
    let watch = {
        let (reg, entry) = (reg.clone(), entry.clone());
        tokio::spawn(async move { reg.gone(&entry).await })
    };

    etcd.kill();
    // Sessions keep working without etcd.
    verified_transfer(&mut decode, &mut prefill, "without-etcd").await;
    // Lookups fail, clearly and in bounded time.
    let t = Instant::now();
    let err = reg.resolve("d0").await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("registry {url} unreachable: ")), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let out = run_kvrail(&["peers", "--registry", &url], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(one_error_line(&out.stderr).starts_with(&format!("kvrail: registry {url} unreachable: ")));
    // Longer than the TTL without etcd: both agents still run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(decode.pid().is_some() && prefill.pid().is_some(), "an agent died without etcd");
    assert!(!watch.is_finished(), "etcd being away was taken for the peer leaving");

    etcd.restart();
    let back = resolved_within(&reg, "d0", Duration::from_secs(10)).await.expect("lookups recover");
    assert_eq!(back, entry);
    verified_transfer(&mut decode, &mut prefill, "etcd-back").await;
    // Published again under a new lease (the old one's keep-alive broke).
    let deadline = Instant::now() + Duration::from_secs(10);
    let lease_after = loop {
        let l = lease_of(&etcd, "lost", "d0").await.expect("d0's key");
        if l != lease_before || Instant::now() >= deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(lease_after, lease_before, "the agent did not publish itself again");
    // ... and kept alive: still there after several TTLs (the old lease has expired by now).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(reg.resolve("d0").await.unwrap(), entry);
    assert!(!watch.is_finished(), "the peer was reported gone while it kept its entry");
    watch.abort();

    // A key lost under a live agent (its lease revoked) comes back.
    let mut c = etcd_client(&etcd).await;
    c.lease_revoke(lease_after).await.unwrap();
    assert!(lease_of(&etcd, "lost", "d0").await.is_none());
    let again = resolved_within(&reg, "d0", Duration::from_secs(8)).await.expect("re-published after its lease was revoked");
    assert_eq!(again, entry);
    prefill.stop().await;
    decode.stop().await;
}

#[test]
fn bad_registry_flags_are_one_actionable_line() {
    let secret = kvrail_agent::agent::auth::driver_secret();
    let env = [(kvrail_agent::agent::auth::SECRET_VAR, secret.as_str())];
    let dir = std::env::temp_dir().join(format!("kvrail-badpeers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_file = dir.join("peers.jsonl");
    std::fs::write(&bad_file, "# one bad line\n{\"agent_id\":\"a\",\"role\":\"decode\"}\n").unwrap();
    let bad = bad_file.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["decode", "--registry", "http://127.0.0.1:2379/x"], "is not an etcd URL: expected etcd://HOST:PORT/PREFIX"),
        (&["peers", "--registry", "etcd://h:port/x"], "`port` is not a port number"),
        (&["decode", "--peers", bad], "line 2: not a registry entry (missing field `address`"),
        (&["decode", "--registry", "etcd://127.0.0.1:1/x", "--listen", "0.0.0.0:0"], "give --advertise HOST:PORT"),
        (&["decode", "--registry", "etcd://127.0.0.1:1/x", "--agent-id", "a/b"], "agent id `a/b` cannot name a registry key"),
    ];
    for (args, says) in cases {
        let out = run_kvrail_env(args, &env, Duration::from_secs(30));
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        let first = err.lines().find(|l| l.starts_with("kvrail:") || l.starts_with("error:")).unwrap_or_default();
        assert!(first.contains(says), "{args:?}: {err}");
    }
    let out = run_kvrail(&["peers"], Duration::from_secs(30));
    assert_eq!(one_error_line(&out.stderr), "kvrail: no registry: give --registry etcd://HOST:PORT/PREFIX and/or --peers FILE");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_id_replaces_the_entry_and_the_old_instance_stops_publishing() {
    let etcd = EtcdServer::start("restart");
    let url = etcd.url("restart");
    let old = spawn(agent_args("decode", "d0", &url, "2s")).await;
    let reg = registry(&url).await;
    let first = reg.resolve("d0").await.unwrap();
    let watch = {
        let (reg, first) = (reg.clone(), first.clone());
        tokio::spawn(async move { reg.gone(&first).await })
    };
    // The old instance still runs (a hung process, a partition that heals).
    let new = spawn(agent_args("decode", "d0", &url, "2s")).await;
    let gone = tokio::time::timeout(Duration::from_secs(5), watch).await.expect("replacement seen").unwrap();
    let second = reg.resolve("d0").await.unwrap();
    assert_eq!(second.address, new.listen);
    assert!(second.epoch > first.epoch);
    assert_eq!(gone, Gone::Replaced { agent_id: "d0".into(), old_epoch: first.epoch, new_epoch: second.epoch });
    // The old one gives up its claim instead of fighting over the key.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reg.resolve("d0").await.unwrap(), second);
    assert!(old.log.lines().iter().any(|l| l.contains("a newer instance of agent `d0`")), "{:?}", old.log.lines());
    // Its orderly stop leaves the new instance's key alone.
    old.stop().await;
    assert_eq!(reg.resolve("d0").await.unwrap(), second);
    new.stop().await;
}

/// A decode agent with a registry dials a prefill agent that a request
/// names by id alone: the id is resolved in etcd, the session handshaken
/// (the cluster secret still decides), and the blocks verify. An id the
/// registry does not hold fails that request, naming it.
#[tokio::test]
async fn a_request_naming_a_prefill_agent_by_id_dials_it_through_the_registry() {
    use kvrail_agent::drive::workload::run_request;
    use kvrail_proto::v1 as pb;
    let etcd = EtcdServer::start("byid");
    let url = etcd.url("byid");
    let mut decode = spawn(agent_args("decode", "d1", &url, "5s")).await;
    let mut prefill = spawn(agent_args("prefill", "p1", &url, "5s")).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 9 }).await.unwrap();
    let (src, dst): (Vec<u32>, Vec<u32>) = ((0..16).collect(), (100..116).collect());
    let req = |id: &str, peer: &str| pb::SubmitRequest {
        request_id: id.into(),
        peer: peer.into(),
        mode: pb::TransferMode::Read as i32,
        src_blocks: src.clone(),
        dst_blocks: dst.clone(),
        ..Default::default()
    };
    let done = run_request(&mut decode.control, req("by-id", "p1")).await.unwrap();
    assert_eq!(done.state, pb::RequestState::Done as i32, "{done:?}");
    let v = decode
        .control
        .verify_pattern(pb::VerifyPatternRequest { seed: 9, src_blocks: src.clone(), dst_blocks: dst.clone() })
        .await
        .unwrap();
    assert_eq!(v.into_inner().verified_blocks, 16);
    let refused = match run_request(&mut decode.control, req("unknown", "nobody")).await {
        Ok(w) => format!("{:?}: {}", pb::RequestState::try_from(w.state), w.error),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("no connected prefill agent is named") && refused.contains("nobody"), "{refused}");
    prefill.stop().await;
    decode.stop().await;
}

/// A prefill agent that stops answering (frozen with SIGSTOP: no goodbye,
/// no broken stream) loses its registry entry within its TTL; the decode
/// agent then fails the request pending on it with the registry's words,
/// long before its session's own lease (30 s here) would have.
#[tokio::test]
async fn a_peer_that_leaves_the_registry_fails_its_pending_requests_at_once() {
    use kvrail_agent::drive::workload::run_request;
    use kvrail_proto::v1 as pb;
    let etcd = EtcdServer::start("left");
    let url = etcd.url("left");
    let mut d = agent_args("decode", "d-left", &url, "2s");
    d.extend(["--lease-secs", "30", "--stall-secs", "30"].map(String::from));
    let mut decode = spawn(d).await;
    let mut p = agent_args("prefill", "p-left", &url, "2s");
    p.extend(["--lease-secs", "30", "--stall-secs", "30"].map(String::from));
    let mut prefill = spawn(p).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 3 }).await.unwrap();
    let req = |id: &str| pb::SubmitRequest {
        request_id: id.into(),
        peer: "p-left".into(),
        mode: pb::TransferMode::Write as i32,
        src_blocks: (0..64).collect(),
        dst_blocks: (0..64).collect(),
        ..Default::default()
    };
    let first = run_request(&mut decode.control, req("before")).await.unwrap();
    assert_eq!(first.state, pb::RequestState::Done as i32, "{first:?}");
    let pid = prefill.pid().expect("prefill runs");
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    let t0 = Instant::now();
    let pending = run_request(&mut decode.control, req("pending")).await;
    let took = t0.elapsed();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status().unwrap().success());
    let pending = pending.unwrap();
    assert_eq!(pending.state, pb::RequestState::Failed as i32, "{pending:?}");
    assert!(pending.error.contains("p-left") && pending.error.contains("left the registry"), "{}", pending.error);
    assert!(took < Duration::from_secs(15), "failed {took:?} after the freeze: the registry's TTL (2 s) and not the 30 s lease");
    prefill.stop().await;
    decode.stop().await;
}
