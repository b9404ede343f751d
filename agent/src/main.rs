//! The `kvrail` binary.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use kvrail_agent::agent::Role;
use kvrail_agent::cli::{Cli, Command};
use kvrail_agent::{cmd, drive, guard};

fn main() -> ExitCode {
    // Before anything touches UCX: re-exec with the hooks-off environment.
    if let Err(e) = guard::ensure() {
        eprintln!("kvrail: {e:#}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // GPU memory needs a CUDA driver: look for it before anything starts
    // (no runtime, no agent, no UCX context, no port).
    if let Some(Err(e)) = cli.cmd.memory().map(|m| m.preflight()) {
        eprintln!("kvrail: {e}");
        return ExitCode::from(1);
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
    // Before the runtime starts: its threads (and the engine's, until the
    // progress thread binds itself) inherit this thread's CPUs.
    if let Some(a) = cli.cmd.agent_args().filter(|a| !a.runtime_cpus.is_empty()) {
        if let Err(e) = kvrail_transfer::cpu::bind_this_thread(&a.runtime_cpus) {
            eprintln!("kvrail: cannot bind the agent's threads to CPUs {:?} (--runtime-cpus): {e}", a.runtime_cpus);
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvrail: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match &cli.cmd {
            Command::Info(a) if a.agent.is_some() => cmd::info::run_agent(a).await,
            Command::Info(a) => cmd::info::run(a),
            Command::Decode(a) => cmd::serve::run(Role::Decode, a, Vec::new()).await,
            Command::Prefill(a) => cmd::serve::run(Role::Prefill, &a.agent, a.peer.clone()).await,
            Command::Demo(a) => drive::demo::run(a).await,
            Command::Soak(a) => drive::soak::run(a).await,
            Command::Bench(a) => drive::bench::run(a).await,
            Command::Peers(a) => cmd::peers::run(a).await,
            Command::RawUcx(a) => drive::raw::run(a),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            // One line a person can act on; the whole chain at debug level.
            tracing::debug!("error chain: {e:?}");
            eprintln!("kvrail: {}", kvrail_agent::diagnose::one_line(&e));
            ExitCode::from(1)
        }
    }
}
