//! `kvrail peers`: the agents a registry holds, one line each (or one JSON
//! object per line), or the one entry `--id` names.

use crate::cli::PeersArgs;
use crate::registry::{Entry, Registry};

pub async fn run(args: &PeersArgs) -> anyhow::Result<i32> {
    let Some(reg) = Registry::open(args.registry.registry.as_ref(), args.registry.peers.as_deref()).await? else {
        anyhow::bail!("no registry: give --registry etcd://HOST:PORT/PREFIX and/or --peers FILE");
    };
    if let Some(id) = &args.id {
        let e = reg.resolve(id).await?;
        print_entry(&e, args.json);
        return Ok(0);
    }
    let listing = reg.list(args.role.map(|r| r.role())).await?;
    for (key, why) in &listing.skipped {
        eprintln!("kvrail: skipped registry entry {key}: {why}");
    }
    for e in &listing.entries {
        print_entry(e, args.json);
    }
    if !args.json {
        eprintln!("{} agent(s) in {}{}", listing.entries.len(), reg.describe(), skipped_note(listing.skipped.len()));
    }
    Ok(0)
}

fn skipped_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} entry(ies) skipped")
    }
}

fn print_entry(e: &Entry, json: bool) {
    if json {
        println!("{}", e.to_json());
    } else {
        let rank = e.rank.map_or("-".to_string(), |r| r.to_string());
        println!(
            "{:<8} {:<24} {:<22} rank={rank:<4} host={} memory={} v{} epoch={}",
            e.role, e.agent_id, e.address, e.host, e.memory, e.protocol_version, e.epoch
        );
    }
}
