//! Leak forensics: parsing `/proc/self/smaps` into classified [`Mapping`]s,
//! [`Snapshot`]s of them, and the [`diff`] of two snapshots that says where
//! resident memory grew, in one actionable sentence.
//!
//! Reading smaps walks every page table of the process, so this is only done
//! rarely (a baseline after warm-up, then when a leak is suspected), never on
//! the per-tick path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sample::parse_kb;
use super::MemWatchError;

/// Path of the smaps file read for snapshots.
pub const SMAPS_PATH: &str = "/proc/self/smaps";

const MIB: f64 = 1024.0 * 1024.0;

/// Below this total RSS growth between snapshots, RSS is called flat.
pub const FLAT_RSS_BYTES: i64 = 1024 * 1024;

/// What backs a mapping, from its path in smaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// The brk heap, `[heap]`.
    Heap,
    /// Private anonymous memory: no path, or `[anon:<name>]`.
    Anon,
    /// A thread stack, `[stack]` or `[stack:<tid>]`.
    Stack,
    /// A regular file (page cache).
    File,
    /// Shared memory: `/dev/shm/...`, `/memfd:...`, `/SYSV...`, shared
    /// anonymous (`/dev/zero (deleted)`), `[anon_shmem:...]`.
    Shmem,
    /// Everything else: `[vdso]`, `[vvar]`, `[vsyscall]`, device nodes.
    Other,
}

impl Backing {
    /// All variants, in report order.
    pub const ALL: [Backing; 6] = [Backing::Heap, Backing::Anon, Backing::Stack, Backing::File, Backing::Shmem, Backing::Other];

    /// Classifies a mapping by its smaps path (`""` for anonymous).
    pub fn classify(path: &str) -> Backing {
        if path.is_empty() || path.starts_with("[anon:") {
            Backing::Anon
        } else if path == "[heap]" {
            Backing::Heap
        } else if path == "[stack]" || path.starts_with("[stack:") {
            Backing::Stack
        } else if path.starts_with("[anon_shmem:")
            || path.starts_with("/dev/shm/")
            || path.starts_with("/memfd:")
            || path.starts_with("/SYSV")
            || path.starts_with("/dev/zero")
        {
            Backing::Shmem
        } else if path.starts_with('[') || path.starts_with("/dev/") {
            Backing::Other
        } else {
            Backing::File
        }
    }

    /// Words for a person: where growth of this backing lives.
    fn place(self) -> &'static str {
        match self {
            Backing::Heap => "the [heap] mapping",
            Backing::Anon => "anonymous mappings outside the heap",
            Backing::Stack => "thread stacks",
            Backing::File => "file-backed mappings",
            Backing::Shmem => "shared-memory mappings (shm, memfd, SysV, shared anonymous)",
            Backing::Other => "special mappings (vdso, devices)",
        }
    }

    /// What to look at next when this backing grows.
    fn hint(self) -> &'static str {
        match self {
            Backing::Heap => "profile malloc allocation sites",
            Backing::Anon => "suspect direct mmap users rather than malloc (e.g. UCX memory hooks or registration cache)",
            Backing::Stack => "check thread creation and recursion depth",
            Backing::File => "check mmapped files that are never unmapped",
            Backing::Shmem => "check shm/memfd segments that are never unlinked or unmapped",
            Backing::Other => "check device mappings (GPU, RDMA)",
        }
    }
}

/// One mapping of `/proc/<pid>/smaps`. Sizes are bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// File offset.
    pub offset: u64,
    /// Path or pseudo-path; `""` for anonymous memory.
    pub path: String,
    /// Classification of `path`.
    pub backing: Backing,
    /// `Rss`.
    pub rss: u64,
    /// `Anonymous`.
    pub anonymous: u64,
    /// `Size` (virtual).
    pub size: u64,
}

impl Mapping {
    /// `0x<start>-0x<end>`.
    pub fn range(&self) -> String {
        format!("{:#x}-{:#x}", self.start, self.end)
    }

    fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Splits off the first whitespace-delimited token.
fn token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// Parses a smaps header line `start-end perms offset dev inode [path]`.
fn parse_header(line: &str) -> Option<Mapping> {
    let (range, rest) = token(line)?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let (perms, rest) = token(rest)?;
    let (offset, rest) = token(rest)?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let (_dev, rest) = token(rest)?;
    let (_inode, rest) = token(rest)?;
    let path = rest.trim().to_owned();
    Some(Mapping { start, end, perms: perms.to_owned(), offset, backing: Backing::classify(&path), path, rss: 0, anonymous: 0, size: 0 })
}

/// Parses full `/proc/<pid>/smaps` text (not `smaps_rollup`).
///
/// Lenient by design, since the field set varies by kernel: lines that are
/// neither a mapping header nor a known `Key: N kB` field are skipped. The
/// result is in address order, as the kernel writes it.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let Some((first, rest)) = token(line) else {
            continue;
        };
        if let Some(key) = first.strip_suffix(':') {
            let Some(cur) = out.last_mut() else {
                continue;
            };
            let slot = match key {
                "Size" => &mut cur.size,
                "Rss" => &mut cur.rss,
                "Anonymous" => &mut cur.anonymous,
                _ => continue,
            };
            if let Some(v) = parse_kb(rest) {
                *slot = v;
            }
        } else if let Some(m) = parse_header(line) {
            out.push(m);
        }
    }
    out
}

/// Resident bytes of one backing class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingTotal {
    /// The class.
    pub backing: Backing,
    /// Sum of `Rss` over its mappings.
    pub rss: u64,
    /// Number of its mappings.
    pub mappings: usize,
}

/// The mappings of the process at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the watch started.
    pub taken_at_secs: f64,
    /// Allocator-reported heap bytes at that moment, if known. Without it,
    /// [`diff`] falls back to the `[heap]` mapping, which misses mmapped
    /// allocations and non-main arenas.
    pub heap: Option<u64>,
    /// Mappings in address order.
    pub mappings: Vec<Mapping>,
}

impl Snapshot {
    /// Builds a snapshot from smaps text.
    pub fn from_smaps(taken_at_secs: f64, heap: Option<u64>, text: &str) -> Self {
        Self { taken_at_secs, heap, mappings: parse_smaps(text) }
    }

    /// Reads `/proc/self/smaps`. Slow for big processes: call off the
    /// async executor (e.g. `spawn_blocking`).
    pub fn read(taken_at_secs: f64, heap: Option<u64>) -> Result<Self, MemWatchError> {
        let text = std::fs::read_to_string(SMAPS_PATH).map_err(|source| MemWatchError::Io { path: SMAPS_PATH, source })?;
        Ok(Self::from_smaps(taken_at_secs, heap, &text))
    }

    /// Totals per backing, every backing listed in [`Backing::ALL`] order.
    pub fn totals(&self) -> Vec<BackingTotal> {
        let mut acc: BTreeMap<Backing, (u64, usize)> = Backing::ALL.iter().map(|b| (*b, (0, 0))).collect();
        for m in &self.mappings {
            let e = acc.entry(m.backing).or_default();
            e.0 += m.rss;
            e.1 += 1;
        }
        acc.into_iter().map(|(backing, (rss, mappings))| BackingTotal { backing, rss, mappings }).collect()
    }

    /// Sum of `Rss` over all mappings.
    pub fn total_rss(&self) -> u64 {
        self.mappings.iter().map(|m| m.rss).sum()
    }

    fn backing_rss(&self, b: Backing) -> u64 {
        self.mappings.iter().filter(|m| m.backing == b).map(|m| m.rss).sum()
    }
}

/// Resident bytes of one backing class in the baseline and now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingGrowth {
    /// The class.
    pub backing: Backing,
    /// Baseline RSS.
    pub rss_then: u64,
    /// Current RSS.
    pub rss_now: u64,
}

/// One mapping whose RSS grew since the baseline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingGrowth {
    /// `0x<start>-0x<end>` of the current mapping.
    pub range: String,
    /// Its class.
    pub backing: Backing,
    /// Its path (`""` for anonymous).
    pub path: String,
    /// Bytes of the baseline mappings it covers (0 for a new mapping).
    pub size_then: u64,
    /// Its size now.
    pub size_now: u64,
    /// Baseline RSS attributed to it (0 for a new mapping).
    pub rss_then: u64,
    /// Its RSS now.
    pub rss_now: u64,
}

impl MappingGrowth {
    /// RSS growth in bytes.
    pub fn growth(&self) -> u64 {
        self.rss_now.saturating_sub(self.rss_then)
    }
}

/// Where memory grew between a baseline and a current snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forensics {
    /// When the baseline was taken.
    pub baseline_at_secs: f64,
    /// When the current snapshot was taken.
    pub now_at_secs: f64,
    /// Total smaps RSS in the baseline.
    pub rss_then: u64,
    /// Total smaps RSS now.
    pub rss_now: u64,
    /// Heap bytes in the baseline (allocator figure, else `[heap]` RSS).
    pub heap_then: u64,
    /// Heap bytes now (same source as `heap_then`).
    pub heap_now: u64,
    /// Whether the heap figures come from the allocator (`true`) or from
    /// the `[heap]` mapping (`false`).
    pub heap_from_allocator: bool,
    /// RSS per backing class, then and now, in [`Backing::ALL`] order.
    pub by_backing: Vec<BackingGrowth>,
    /// The mappings that grew most, largest growth first.
    pub grown: Vec<MappingGrowth>,
    /// One actionable sentence.
    pub summary: String,
}

fn mib(bytes: i64) -> String {
    format!("{:+.1} MiB", bytes as f64 / MIB)
}

fn delta(then: u64, now: u64) -> i64 {
    i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(i64::try_from(then).unwrap_or(i64::MAX))
}

/// Compares two snapshots and says where RSS grew.
///
/// Mappings are matched by address and path: a current mapping is credited
/// with the baseline RSS of the same-path baseline mappings its range
/// overlaps, prorated by overlap. An unchanged mapping (same start, path
/// and range) thus matches exactly; one absent in the baseline grows from
/// zero; and anonymous VMAs that merged or split since the baseline are
/// not reported as all-new. Because per-mapping attribution remains
/// approximate, totals per backing are reported as well. `grown` holds the
/// `top_n` mappings with the largest RSS growth.
pub fn diff(baseline: &Snapshot, now: &Snapshot, top_n: usize) -> Forensics {
    let base = &baseline.mappings;
    let mut grown: Vec<MappingGrowth> = Vec::new();
    let mut grown_count: BTreeMap<Backing, usize> = BTreeMap::new();
    for m in &now.mappings {
        let (mut rss_then, mut size_then) = (0u64, 0u64);
        // Baseline is address-sorted and non-overlapping: find the first
        // mapping ending after m.start, walk while it starts before m.end.
        let first = base.partition_point(|b| b.end <= m.start);
        for b in base[first..].iter().take_while(|b| b.start < m.end) {
            if b.path != m.path {
                continue;
            }
            let overlap = b.end.min(m.end).saturating_sub(b.start.max(m.start));
            size_then += overlap;
            rss_then += if overlap >= b.len() {
                b.rss
            } else {
                // u128 avoids overflow of rss * overlap.
                (u128::from(b.rss) * u128::from(overlap) / u128::from(b.len().max(1))) as u64
            };
        }
        if m.rss > rss_then {
            *grown_count.entry(m.backing).or_default() += 1;
            grown.push(MappingGrowth {
                range: m.range(),
                backing: m.backing,
                path: m.path.clone(),
                size_then,
                size_now: m.size.max(m.len()),
                rss_then,
                rss_now: m.rss,
            });
        }
    }
    grown.sort_by(|a, b| b.growth().cmp(&a.growth()).then_with(|| a.range.cmp(&b.range)));

    let by_backing: Vec<BackingGrowth> = Backing::ALL
        .iter()
        .map(|&backing| BackingGrowth { backing, rss_then: baseline.backing_rss(backing), rss_now: now.backing_rss(backing) })
        .collect();

    let (heap_then, heap_now, heap_from_allocator) = match (baseline.heap, now.heap) {
        (Some(a), Some(b)) => (a, b, true),
        _ => (baseline.backing_rss(Backing::Heap), now.backing_rss(Backing::Heap), false),
    };
    let (rss_then, rss_now) = (baseline.total_rss(), now.total_rss());
    let summary = summarize(&SummaryInput {
        secs: now.taken_at_secs - baseline.taken_at_secs,
        rss_delta: delta(rss_then, rss_now),
        heap_delta: delta(heap_then, heap_now),
        heap_from_allocator,
        by_backing: &by_backing,
        grown: &grown,
        grown_count: &grown_count,
    });
    grown.truncate(top_n);
    Forensics {
        baseline_at_secs: baseline.taken_at_secs,
        now_at_secs: now.taken_at_secs,
        rss_then,
        rss_now,
        heap_then,
        heap_now,
        heap_from_allocator,
        by_backing,
        grown,
        summary,
    }
}

struct SummaryInput<'a> {
    secs: f64,
    rss_delta: i64,
    heap_delta: i64,
    heap_from_allocator: bool,
    by_backing: &'a [BackingGrowth],
    /// All grown mappings, largest growth first (before truncation).
    grown: &'a [MappingGrowth],
    grown_count: &'a BTreeMap<Backing, usize>,
}

/// Builds the one-sentence summary.
///
/// * RSS growth under [`FLAT_RSS_BYTES`], net and in the mappings that
///   grew: RSS is flat. A leak can hide in the net figure when memory
///   resident at the baseline has been released since (an allocator arena
///   trimmed after a burst of allocations): a soak's leaking agent showed
///   -2.0 MiB net while its leaking mappings had grown by 8.8 MiB and an
///   arena had shrunk by 10.9. Then the growth is what the grown mappings
///   add up to, and the net figure is given beside it.
/// * The heap accounts for at least half the growth: "the heap grows".
/// * The heap accounts for under a tenth: "RSS grows but the heap does not",
///   then where the growth is.
/// * In between: RSS grows faster than the heap, then where the rest is.
fn summarize(i: &SummaryInput<'_>) -> String {
    let over = format!("over {:.0} s", i.secs.max(0.0));
    let heap_src = if i.heap_from_allocator { "heap" } else { "heap ([heap] mapping)" };
    let grown_by = |backing: Option<Backing>| -> i64 {
        i.grown.iter().filter(|g| backing.is_none_or(|b| g.backing == b)).map(|g| delta(g.rss_then, g.rss_now)).sum()
    };
    let net_flat = i.rss_delta < FLAT_RSS_BYTES;
    let gross = grown_by(None);
    if net_flat && gross < FLAT_RSS_BYTES {
        return format!(
            "RSS is flat since the baseline ({} RSS, {} {heap_src} {over}); nothing to attribute.",
            mib(i.rss_delta),
            mib(i.heap_delta)
        );
    }
    let (growth, figures) = if net_flat {
        (gross, format!("RSS {} in the mappings that grew, {} net, {heap_src} {} {over}", mib(gross), mib(i.rss_delta), mib(i.heap_delta)))
    } else {
        (i.rss_delta, format!("RSS {}, {heap_src} {} {over}", mib(i.rss_delta), mib(i.heap_delta)))
    };
    let heap_share = i.heap_delta as f64 / growth as f64;
    if heap_share >= 0.5 {
        return format!("RSS grows and the heap grows with it ({figures}): the leak is in malloc'd memory; {}.", Backing::Heap.hint());
    }
    // Where the non-heap growth is: the backing with the largest growth,
    // not counting the heap itself when the allocator figure is used.
    let place = i
        .by_backing
        .iter()
        .filter(|b| !(b.backing == Backing::Heap && i.heap_from_allocator))
        .map(|b| (b.backing, if net_flat { grown_by(Some(b.backing)) } else { delta(b.rss_then, b.rss_now) }))
        .max_by_key(|(_, d)| *d)
        .filter(|(_, d)| *d > 0);
    let lead = if heap_share < 0.1 {
        format!("RSS grows but the heap does not ({figures})")
    } else {
        format!("RSS grows faster than the heap ({figures})")
    };
    let Some((backing, grew)) = place else {
        return format!("{lead}, but no mapping class grew in smaps; compare VmRSS with smaps totals.");
    };
    let n = i.grown_count.get(&backing).copied().unwrap_or(0);
    let largest = i
        .grown
        .iter()
        .find(|g| g.backing == backing)
        .map(|g| {
            let p = if g.path.is_empty() { String::new() } else { format!(" {}", g.path) };
            format!(", largest {}{p} {}", g.range, mib(delta(g.rss_then, g.rss_now)))
        })
        .unwrap_or_default();
    format!(
        "{lead}: growth is in {}: {} in {n} mapping{}{largest}; {}.",
        backing.place(),
        mib(grew),
        if n == 1 { "" } else { "s" },
        backing.hint()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("testdata/smaps_baseline.txt");
    const GROWN: &str = include_str!("testdata/smaps_grown.txt");
    const KIB: u64 = 1024;

    /// A leak hidden in the net figure by memory released elsewhere since
    /// the baseline (the shape a soak's leaking agent once showed: -2.0 MiB
    /// net, its leaking mappings +8.8 MiB, an arena -10.9 MiB) is still
    /// attributed; without growth anywhere, RSS is flat.
    #[test]
    fn growth_offset_by_a_release_is_still_attributed() {
        const MIB_U: u64 = 1 << 20;
        let leak = MappingGrowth {
            range: "0x7f0000000000-0x7f0000900000".into(),
            backing: Backing::Anon,
            path: String::new(),
            size_then: 0,
            size_now: 9 * MIB_U,
            rss_then: 0,
            rss_now: 9 * MIB_U,
        };
        let anon = BackingGrowth { backing: Backing::Anon, rss_then: 17 * MIB_U, rss_now: 15 * MIB_U };
        let count = BTreeMap::from([(Backing::Anon, 1)]);
        let input = |grown: &[MappingGrowth]| -> String {
            summarize(&SummaryInput {
                secs: 105.0,
                rss_delta: -2 * MIB as i64,
                heap_delta: 0,
                heap_from_allocator: true,
                by_backing: std::slice::from_ref(&anon),
                grown,
                grown_count: &count,
            })
        };
        let s = input(std::slice::from_ref(&leak));
        assert!(s.starts_with("RSS grows but the heap does not (RSS +9.0 MiB in the mappings that grew, -2.0 MiB net"), "{s}");
        assert!(s.contains("anonymous mappings outside the heap: +9.0 MiB in 1 mapping"), "{s}");
        assert!(input(&[]).starts_with("RSS is flat since the baseline (-2.0 MiB RSS"), "{}", input(&[]));
    }

    #[test]
    fn parses_recorded_smaps() {
        let maps = parse_smaps(BASE);
        assert_eq!(maps.len(), 30);
        assert!(maps.windows(2).all(|w| w[0].end <= w[1].start));
        let heap = maps.iter().find(|m| m.backing == Backing::Heap).unwrap();
        assert_eq!(heap.path, "[heap]");
        assert_eq!(heap.range(), "0x5557a0998000-0x5557a0c59000");
        assert_eq!(heap.size, 2820 * KIB);
        assert_eq!(heap.size, heap.end - heap.start);
        assert_eq!(heap.rss, 2692 * KIB);
        assert_eq!(heap.anonymous, 2692 * KIB);
        assert_eq!(heap.perms, "rw-p");
        let libc = maps.iter().find(|m| m.path.ends_with("libc.so.6") && m.offset > 0).unwrap();
        assert_eq!(libc.backing, Backing::File);
        assert!(maps.iter().all(|m| m.size == m.end - m.start));
    }

    #[test]
    fn classifies_backings() {
        let maps = parse_smaps(BASE);
        let class = |path: &str| maps.iter().find(|m| m.path == path).map(|m| m.backing);
        assert_eq!(class("[heap]"), Some(Backing::Heap));
        assert_eq!(class(""), Some(Backing::Anon));
        assert_eq!(class("[stack]"), Some(Backing::Stack));
        assert_eq!(class("[vdso]"), Some(Backing::Other));
        assert_eq!(class("[vvar]"), Some(Backing::Other));
        assert_eq!(class("[vsyscall]"), Some(Backing::Other));
        assert_eq!(class("/dev/shm/kvrail-fixture (deleted)"), Some(Backing::Shmem));
        assert_eq!(class("/memfd:kvrail-kv (deleted)"), Some(Backing::Shmem));
        assert_eq!(class("/dev/zero (deleted)"), Some(Backing::Shmem));
        assert_eq!(class("/usr/lib/locale/C.utf8/LC_CTYPE"), Some(Backing::File));
        // A shared (r--s) mapping of a regular file is still file-backed.
        assert_eq!(class("/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"), Some(Backing::File));
        // Not in the recording (kernel without CONFIG_ANON_VMA_NAME etc.).
        assert_eq!(Backing::classify("[anon:ucx_rcache]"), Backing::Anon);
        assert_eq!(Backing::classify("[anon_shmem:kv]"), Backing::Shmem);
        assert_eq!(Backing::classify("[stack:1234]"), Backing::Stack);
        assert_eq!(Backing::classify("/SYSV00000000 (deleted)"), Backing::Shmem);
        assert_eq!(Backing::classify("/dev/infiniband/uverbs0"), Backing::Other);
        assert_eq!(Backing::classify("/tmp/data.bin (deleted)"), Backing::File);

        let snap = Snapshot::from_smaps(0.0, None, BASE);
        let totals = snap.totals();
        assert_eq!(totals.len(), Backing::ALL.len());
        let shmem = totals.iter().find(|t| t.backing == Backing::Shmem).unwrap();
        assert_eq!(shmem.mappings, 3);
        // 2 MiB of /dev/shm + 1 MiB memfd + 1 MiB shared anonymous touched.
        assert_eq!(shmem.rss, 4 * 1024 * KIB);
        assert_eq!(totals.iter().map(|t| t.rss).sum::<u64>(), snap.total_rss());
    }

    #[test]
    fn parse_skips_garbage_and_unknown_fields() {
        let text = "garbage line\n\
                    Rss: 4 kB\n\
                    7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n\
                    Size:                  8 kB\n\
                    Rss:                   4 kB\n\
                    Anonymous:             4 kB\n\
                    FutureField:           9 kB\n\
                    VmFlags: rd wr mr mw me ac \n\
                    7f0000002000-7f0000003000 r--p 00001000 fe:00 42   /opt/my lib/with spaces.so\n\
                    Rss: bogus\n";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[0].size, maps[0].rss, maps[0].anonymous), (8192, 4096, 4096));
        assert_eq!(maps[0].backing, Backing::Anon);
        assert_eq!(maps[1].path, "/opt/my lib/with spaces.so");
        assert_eq!(maps[1].offset, 0x1000);
        assert_eq!(maps[1].rss, 0);
    }

    /// Recorded: a process with a flat heap maps and touches a new 16 MiB
    /// private anonymous region (what a munmap-hook queue looks like).
    #[test]
    fn diff_finds_new_anonymous_mapping_with_flat_heap() {
        let heap = Some(40 * 1024 * 1024);
        let base = Snapshot::from_smaps(30.0, heap, BASE);
        let now = Snapshot::from_smaps(150.0, heap, GROWN);
        let f = diff(&base, &now, 5);

        let top = &f.grown[0];
        assert_eq!(top.range, "0x7f3165e00000-0x7f3166e00000");
        assert_eq!(top.backing, Backing::Anon);
        assert_eq!(top.path, "");
        assert_eq!((top.rss_then, top.size_then), (0, 0));
        assert_eq!(top.rss_now, 16 * 1024 * 1024);
        assert_eq!(top.size_now, 16 * 1024 * 1024);
        assert!(f.grown.len() <= 5);

        let anon = f.by_backing.iter().find(|b| b.backing == Backing::Anon).unwrap();
        assert!(anon.rss_now - anon.rss_then >= 16 * 1024 * 1024);
        let heap_b = f.by_backing.iter().find(|b| b.backing == Backing::Heap).unwrap();
        assert_eq!(heap_b.rss_then, heap_b.rss_now);
        assert!(f.heap_from_allocator);

        assert!(f.summary.starts_with("RSS grows but the heap does not"), "{}", f.summary);
        assert!(
            f.summary.contains(
                "growth is in anonymous mappings outside the heap: +16.0 MiB in 1 mapping, largest 0x7f3165e00000-0x7f3166e00000 +16.0 MiB"
            ),
            "{}",
            f.summary
        );
        assert!(f.summary.contains("over 120 s"), "{}", f.summary);
        // Serialises with lowercase backings.
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["grown"][0]["backing"], "anon");
    }

    fn anon(start: u64, end: u64, rss: u64, path: &str) -> Mapping {
        Mapping {
            start,
            end,
            perms: "rw-p".into(),
            offset: 0,
            path: path.into(),
            backing: Backing::classify(path),
            rss,
            anonymous: rss,
            size: end - start,
        }
    }

    fn snap(t: f64, heap: Option<u64>, mappings: Vec<Mapping>) -> Snapshot {
        Snapshot { taken_at_secs: t, heap, mappings }
    }

    #[test]
    fn diff_says_when_the_heap_grows() {
        const M: u64 = 1024 * 1024;
        let base = snap(0.0, Some(10 * M), vec![anon(0x1000_0000, 0x2000_0000, 10 * M, "[heap]")]);
        let now = snap(60.0, Some(40 * M), vec![anon(0x1000_0000, 0x4000_0000, 40 * M, "[heap]")]);
        let f = diff(&base, &now, 10);
        assert!(f.summary.contains("the heap grows"), "{}", f.summary);
        assert!(!f.summary.contains("does not"), "{}", f.summary);
        assert_eq!(f.grown[0].rss_then, 10 * M);
        assert_eq!(f.grown[0].backing, Backing::Heap);

        // Without allocator figures the [heap] mapping stands in.
        let f = diff(&snap(0.0, None, base.mappings.clone()), &snap(60.0, None, now.mappings.clone()), 10);
        assert!(!f.heap_from_allocator);
        assert!(f.summary.contains("the heap grows"), "{}", f.summary);
    }

    #[test]
    fn diff_flat_and_merged_vmas() {
        const M: u64 = 1024 * 1024;
        // Baseline: two anon VMAs. Now: they merged and extended downward
        // with 1 MiB more resident, plus a shmem segment of 8 MiB.
        let base = snap(0.0, Some(M), vec![anon(0x20_0000, 0x40_0000, M, ""), anon(0x40_0000, 0x60_0000, M, "")]);
        let now = snap(10.0, Some(M), vec![anon(0x10_0000, 0x60_0000, 3 * M, ""), anon(0x100_0000, 0x200_0000, 8 * M, "/dev/shm/kv-pool")]);
        let f = diff(&base, &now, 10);
        assert_eq!(f.grown.len(), 2);
        assert_eq!(f.grown[0].backing, Backing::Shmem);
        assert_eq!(f.grown[1].rss_then, 2 * M, "merged VMA credited with both baselines");
        assert_eq!(f.grown[1].size_then, 4 * M);
        assert!(f.summary.starts_with("RSS grows but the heap does not"), "{}", f.summary);
        assert!(f.summary.contains("growth is in shared-memory mappings"), "{}", f.summary);

        // A split VMA with unchanged RSS is not growth, and RSS is flat.
        let split = snap(
            10.0,
            Some(M),
            vec![anon(0x20_0000, 0x30_0000, M / 2, ""), anon(0x30_0000, 0x40_0000, M / 2, ""), anon(0x40_0000, 0x60_0000, M, "")],
        );
        let f = diff(&base, &split, 10);
        assert!(f.grown.is_empty(), "{:?}", f.grown);
        assert!(f.summary.starts_with("RSS is flat"), "{}", f.summary);
    }
}
