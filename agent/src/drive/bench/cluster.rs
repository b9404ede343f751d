//! Cluster mode (`--peer`): the running decode agent on another host, and
//! the bench's arguments with that agent's transport, block size and region
//! adopted.

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use kvrail_transfer::Transport;

use crate::cli::BenchArgs;
use crate::drive::children::control_at;
use crate::drive::workload::Control;

/// Cluster mode (`--peer`): the running decode agent and what it serves.
pub(super) struct Remote {
    pub(super) addr: String,
    pub(super) decode: Control,
    pub(super) info: pb::AgentInfo,
}

impl Remote {
    pub(super) async fn connect(a: &BenchArgs, addr: &str) -> anyhow::Result<Remote> {
        anyhow::ensure!(
            crate::agent::auth::ClusterSecret::load(a.cluster_secret_file.as_deref())?.is_some(),
            "--peer: the prefill agents this bench starts need the cluster's secret: set {} or pass --cluster-secret-file",
            crate::agent::auth::SECRET_VAR
        );
        let tls = a.tls.load()?;
        let mut decode = control_at(addr, tls.as_ref()).await.with_context(|| format!("cannot reach the decode agent at {addr}"))?;
        let info =
            decode.info(pb::InfoRequest {}).await?.into_inner().agent.with_context(|| format!("the agent at {addr} sent no AgentInfo"))?;
        Ok(Remote { addr: addr.to_string(), decode, info })
    }
}

/// With `--peer`: the bench's arguments with the transport, block size and
/// region of the decode agent (`info`) in place. The command line may name
/// them, but nothing else.
pub fn adopt_peer(a: &BenchArgs, info: &pb::AgentInfo) -> anyhow::Result<BenchArgs> {
    let peer = a.peer.as_deref().unwrap_or_default();
    anyhow::ensure!(
        info.role == pb::Role::Decode as i32,
        "the agent at {peer} is not a decode agent: --peer names the decode agent to measure against"
    );
    let layout = info.layout.as_ref().with_context(|| format!("the agent at {peer} reported no block layout"))?;
    anyhow::ensure!(
        layout.num_layers <= 1,
        "the decode agent at {peer} has a layer-major layout ({} layers), and the bench compares whole blocks with the raw-UCX loop: measure against an agent started without --layers",
        layout.num_layers
    );
    let t: Transport =
        info.transport.parse().map_err(|e| anyhow::anyhow!("the decode agent at {peer} reports transport {:?}: {e}", info.transport))?;
    let region = u64::from(layout.num_blocks) * layout.block_bytes;
    agree("--transport", &a.transport, &t, peer)?;
    agree("--block-bytes", &a.block_bytes, &layout.block_bytes, peer)?;
    agree("--region-bytes", a.region_bytes.as_slice(), &region, peer)?;
    Ok(BenchArgs { transport: vec![t], block_bytes: vec![layout.block_bytes], region_bytes: Some(region), ..a.clone() })
}

/// Every value `given` for `flag` is the decode agent's own.
fn agree<T: PartialEq + std::fmt::Display>(flag: &str, given: &[T], theirs: &T, peer: &str) -> anyhow::Result<()> {
    match given.iter().find(|g| *g != theirs) {
        None => Ok(()),
        Some(g) => Err(anyhow::anyhow!(
            "{flag} {g} is not what the decode agent at {peer} serves ({theirs}): leave {flag} out to measure the agent's, or start the agent with {flag} {g}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(extra: &[&str]) -> BenchArgs {
        use clap::Parser as _;
        let argv = ["kvrail", "bench"].into_iter().chain(extra.iter().copied());
        match crate::cli::Cli::try_parse_from(argv).unwrap().cmd {
            crate::cli::Command::Bench(a) => a,
            c => panic!("not bench: {c:?}"),
        }
    }

    fn decode_info(transport: &str, block: u64, blocks: u32, layers: u32) -> pb::AgentInfo {
        pb::AgentInfo {
            role: pb::Role::Decode as i32,
            transport: transport.into(),
            layout: Some(pb::BlockLayout { block_bytes: block, num_blocks: blocks, num_layers: layers, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn without_peer_the_lists_default_and_with_peer_the_agent_decides() {
        let local = bench_args(&[]);
        assert_eq!(local.transports(), [Transport::Sm, Transport::Tcp]);
        assert_eq!(local.blocks(), [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]);
        assert_eq!(local.region(), 1 << 30);

        let peer = ["--peer", "10.0.0.2:7000", "--raw-peer", "10.0.0.2:7001"];
        let info = decode_info("tcp", 64 << 10, 4096, 1);
        let a = adopt_peer(&bench_args(&peer), &info).unwrap();
        assert_eq!((a.transports(), a.blocks(), a.region()), (vec![Transport::Tcp], vec![64 << 10], 256 << 20));
        // Naming the agent's own values is fine.
        let same = [&peer[..], &["--transport", "tcp", "--block-bytes", "64KiB", "--region-bytes", "256MiB"]].concat();
        assert_eq!(adopt_peer(&bench_args(&same), &info).unwrap().blocks(), [64 << 10]);
    }

    #[test]
    fn peer_mode_refuses_what_the_decode_agent_does_not_serve() {
        let peer = ["--peer", "10.0.0.2:7000", "--raw-peer", "10.0.0.2:7001"];
        let info = decode_info("tcp", 64 << 10, 4096, 1);
        let err =
            |extra: &[&str], info: &pb::AgentInfo| adopt_peer(&bench_args(&[&peer[..], extra].concat()), info).unwrap_err().to_string();
        let e = err(&["--block-bytes", "64KiB,1MiB"], &info);
        assert!(e.contains("--block-bytes 1048576") && e.contains("(65536)") && e.contains("10.0.0.2:7000"), "{e}");
        let e = err(&["--transport", "sm"], &info);
        assert!(e.contains("--transport sm") && e.contains("(tcp)"), "{e}");
        let e = err(&["--region-bytes", "1GiB"], &info);
        assert!(e.contains("--region-bytes") && e.contains("268435456"), "{e}");
        let e = err(&[], &decode_info("tcp", 64 << 10, 4096, 4));
        assert!(e.contains("4 layers"), "{e}");
        let e = err(&[], &pb::AgentInfo { role: pb::Role::Prefill as i32, ..info.clone() });
        assert!(e.contains("not a decode agent"), "{e}");
        let e = err(&[], &decode_info("rdma?", 64 << 10, 4096, 1));
        assert!(e.contains("reports transport"), "{e}");
        // clap: the two addresses go together.
        use clap::Parser as _;
        assert!(crate::cli::Cli::try_parse_from(["kvrail", "bench", "--peer", "h:1"]).is_err());
        assert!(crate::cli::Cli::try_parse_from(["kvrail", "bench", "--raw-peer", "h:1"]).is_err());
    }
}
