//! `kvrail info`: the UCX actually loaded, its transports (and its CUDA
//! ones), the verified hook mode, and the GPUs the CUDA driver sees; with
//! `--agent`, a running agent and its peer sessions.

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
    /// The loaded UCX's CUDA transport modules (none: built without CUDA).
    ucx_cuda_modules: Vec<String>,
    /// The CUDA transports a default context brings up (they need the
    /// modules, a driver and a device).
    ucx_cuda_transports: kvrail_transfer::ucx_facts::CudaTransports,
    gpus: Gpus,
    mmap_hook_mode: String,
    hooks_off: bool,
    hooks: kvrail_transfer::hooks::HookReport,
    guard_env_missing: Vec<String>,
}

/// What the CUDA driver says: its version and devices, or why there is none.
#[derive(Debug, Serialize)]
struct Gpus {
    /// `12.8`; `None` without a driver.
    driver_version: Option<String>,
    devices: Vec<Gpu>,
    /// Why no GPU can be used (no driver, built without CUDA), if so.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Gpu {
    ordinal: usize,
    name: String,
    uuid: String,
    pci_bus_id: String,
    total_bytes: u64,
    used_bytes: Option<u64>,
}

fn gpus() -> Gpus {
    match kvrail_cuda::probe() {
        Ok(info) => Gpus {
            driver_version: Some(format!("{}.{}", info.driver_version_major_minor().0, info.driver_version_major_minor().1)),
            devices: info
                .devices
                .into_iter()
                .map(|d| Gpu {
                    ordinal: d.ordinal,
                    name: d.name,
                    uuid: d.uuid,
                    pci_bus_id: d.pci_bus_id,
                    total_bytes: d.total_mem,
                    used_bytes: d.used_mem,
                })
                .collect(),
            error: None,
        },
        Err(e) => Gpus { driver_version: None, devices: Vec::new(), error: Some(e.to_string()) },
    }
}

pub fn run(args: &InfoArgs) -> anyhow::Result<i32> {
    let ucx = kvrail_transfer::ucx_facts::ucx_runtime();
    let hooks = kvrail_transfer::hooks::verify();
    let transports = kvrail_transfer::ucx_facts::transports();
    let info = Info {
        kvrail_version: env!("CARGO_PKG_VERSION"),
        protocol_version: kvrail_proto::PROTOCOL_VERSION,
        ucx_version: ucx.version.clone(),
        ucx_library: ucx.library.clone(),
        ucx_supported: ucx.supported,
        ucx_assertions: ucx.assertions,
        ucx_headers: kvrail_transfer::ucx_facts::UCX_HEADERS_VERSION,
        ucx_cuda_transports: kvrail_transfer::ucx_facts::CudaTransports::of(&transports),
        transports,
        ucx_cuda_modules: kvrail_transfer::ucx_facts::cuda_modules(),
        gpus: gpus(),
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
        let c = &info.ucx_cuda_transports;
        let yes = |b: bool| if b { "yes" } else { "no" };
        let modules =
            if info.ucx_cuda_modules.is_empty() { "none: built without CUDA".to_string() } else { info.ucx_cuda_modules.join(" ") };
        println!(
            "UCX CUDA       cuda_copy {} cuda_ipc {} gdr_copy {} (modules: {modules})",
            yes(c.cuda_copy),
            yes(c.cuda_ipc),
            yes(c.gdr_copy)
        );
        match (&info.gpus.driver_version, &info.gpus.error) {
            (Some(v), _) => println!("CUDA driver    {v}, {} GPU(s)", info.gpus.devices.len()),
            (None, Some(e)) => println!("CUDA driver    {e}"),
            (None, None) => {}
        }
        for g in &info.gpus.devices {
            let used = g.used_bytes.map_or("?".to_string(), |u| format!("{:.1}", u as f64 / (1u64 << 30) as f64));
            println!(
                "GPU {}          {} {} pci {} memory {used} / {:.1} GiB used",
                g.ordinal,
                g.name,
                g.uuid,
                g.pci_bus_id,
                g.total_bytes as f64 / (1u64 << 30) as f64
            );
        }
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
