//! `kvrail info`: the UCX actually loaded, its transports, the verified hook mode.

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
