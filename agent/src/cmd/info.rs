//! `kvrail info`: the UCX actually loaded, its transports, the verified
//! hook mode; with `--agent`, a running agent and its peer sessions.

use serde::Serialize;

use crate::cli::InfoArgs;

#[derive(Debug, Serialize)]
struct Info {
    kvrail_version: &'static str,
    protocol_version: u32,
    ucx_version: String,
    ucx_library: String,
    ucx_supported: bool,
    /// The loaded libuct was built with assertions (tcp then sends by copy).
    ucx_assertions: bool,
    ucx_headers: &'static str,
    transports: Vec<String>,
    mmap_hook_mode: String,
    hooks_off: bool,
    hooks: kvrail_transfer::hooks::HookReport,
    guard_env_missing: Vec<String>,
}

pub fn run(args: &InfoArgs) -> anyhow::Result<i32> {
    let ucx = kvrail_transfer::ucx_facts::ucx_runtime();
    let hooks = kvrail_transfer::hooks::verify();
    let info = Info {
        kvrail_version: env!("CARGO_PKG_VERSION"),
        protocol_version: kvrail_proto::PROTOCOL_VERSION,
        ucx_version: ucx.version.clone(),
        ucx_library: ucx.library.clone(),
        ucx_supported: ucx.supported,
        ucx_assertions: ucx.assertions,
        ucx_headers: kvrail_transfer::ucx_facts::UCX_HEADERS_VERSION,
        transports: kvrail_transfer::ucx_facts::transports(),
        mmap_hook_mode: hooks.mode.to_string(),
        hooks_off: hooks.is_off(),
        guard_env_missing: kvrail_transfer::hooks::guard_env_missing().iter().map(|(k, v)| format!("{k}={v}")).collect(),
        hooks,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("kvrail {} (protocol v{})", info.kvrail_version, info.protocol_version);
        println!("UCX version    {}{}", info.ucx_version, if info.ucx_supported { "" } else { "  (NOT SUPPORTED)" });
        println!("UCX library    {}", info.ucx_library);
        println!("UCX assertions {}", if info.ucx_assertions { "on (tcp sends by copy)" } else { "off" });
        println!("transports     {}", info.transports.join(" "));
        println!("mmap hooks     {}", info.hooks.summary());
    }
    Ok(if info.hooks_off && info.ucx_supported { 0 } else { 1 })
}

/// `kvrail info --agent ADDR`: the agent's identity and one line per peer.
pub async fn run_agent(args: &InfoArgs) -> anyhow::Result<i32> {
    let addr = args.agent.as_deref().expect("--agent");
    let mut control = crate::drive::children::control_at(addr, args.tls.load()?.as_ref()).await?;
    let s = control.stats(kvrail_proto::v1::StatsRequest {}).await?.into_inner();
    let role = crate::agent::convert::role_name(s.role);
    if args.json {
        let peers: Vec<serde_json::Value> = s
            .peer_stats
            .iter()
            .map(|p| {
                serde_json::json!({
                    "agent_id": p.agent_id, "address": p.address, "state": p.state, "epoch": p.epoch,
                    "age_ms": p.age_ms, "bytes": p.bytes, "requests_ok": p.requests_ok,
                    "requests_failed": p.requests_failed, "pending": p.pending,
                })
            })
            .collect();
        let v = serde_json::json!({ "agent_id": s.agent_id, "role": role, "transport": s.transport, "peers": peers });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{role} agent {} ({}, {} peer session(s))", s.agent_id, s.transport, s.peer_stats.len());
    println!(
        "{:<24} {:<22} {:>5} {:>9} {:>12} {:>8} {:>7} {:>7}  state",
        "peer", "address", "epoch", "age", "bytes", "ok", "failed", "pending"
    );
    for p in &s.peer_stats {
        let address = if p.address.is_empty() { "(dialled in)" } else { &p.address };
        println!(
            "{:<24} {:<22} {:>5} {:>8.1}s {:>12} {:>8} {:>7} {:>7}  {}",
            p.agent_id,
            address,
            p.epoch,
            p.age_ms as f64 / 1e3,
            crate::units::format_bytes(p.bytes),
            p.requests_ok,
            p.requests_failed,
            p.pending,
            p.state
        );
    }
    Ok(0)
}
