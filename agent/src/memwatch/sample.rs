//! Cheap per-tick memory samples: parsing `/proc/self/status`, counting the
//! lines of `/proc/self/maps`, and the [`Sample`] record the trend code uses.
//!
//! This is the hot path (once per interval), so it never touches
//! `/proc/self/smaps`; that lives in [`super::forensics`] and is read rarely.

use std::fs::File;
use std::io::Read;

use serde::{Deserialize, Serialize};

use super::MemWatchError;

/// Path of the status file read every tick.
pub const STATUS_PATH: &str = "/proc/self/status";
/// Path of the maps file whose lines are counted every tick.
pub const MAPS_PATH: &str = "/proc/self/maps";

/// One point of the memory time series. All sizes are bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the watch started.
    pub t_secs: f64,
    /// Resident set size (`VmRSS`).
    pub vm_rss: u64,
    /// Resident anonymous memory (`RssAnon`).
    pub rss_anon: u64,
    /// Resident file-backed memory (`RssFile`).
    pub rss_file: u64,
    /// Resident shared memory: shmem, memfd, SysV, shared anonymous (`RssShmem`).
    pub rss_shmem: u64,
    /// Number of mappings (lines of `/proc/self/maps`).
    pub maps: u64,
    /// Allocator-reported heap bytes in use, if the caller can tell.
    pub heap: Option<u64>,
}

/// The fields MemWatch takes from `/proc/<pid>/status`, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFields {
    /// `VmRSS`.
    pub vm_rss: u64,
    /// `RssAnon`.
    pub rss_anon: u64,
    /// `RssFile`.
    pub rss_file: u64,
    /// `RssShmem`.
    pub rss_shmem: u64,
}

/// Parses `VmRSS`, `RssAnon`, `RssFile` and `RssShmem` (reported in kB) out of
/// `/proc/<pid>/status` text and returns them in bytes.
///
/// Every one of the four fields must be present exactly as the kernel writes
/// it (`Name:<whitespace><digits> kB`); anything else is an error naming the
/// field, so a truncated or foreign file is not silently read as zero.
pub fn parse_status(text: &str) -> Result<StatusFields, MemWatchError> {
    const FIELDS: [&str; 4] = ["VmRSS", "RssAnon", "RssFile", "RssShmem"];
    let mut found: [Option<u64>; 4] = [None; 4];
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Some(idx) = FIELDS.iter().position(|f| *f == key) else {
            continue;
        };
        let kib = parse_kb(value).ok_or_else(|| MemWatchError::MalformedStatus { field: FIELDS[idx], line: line.to_owned() })?;
        found[idx] = Some(kib);
    }
    let get = |idx: usize| found[idx].ok_or(MemWatchError::MissingStatusField { field: FIELDS[idx] });
    Ok(StatusFields { vm_rss: get(0)?, rss_anon: get(1)?, rss_file: get(2)?, rss_shmem: get(3)? })
}

/// Parses `"   1234 kB"` into bytes.
pub(crate) fn parse_kb(value: &str) -> Option<u64> {
    let mut parts = value.split_ascii_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next()) {
        (Some("kB"), None) => n.checked_mul(1024),
        _ => None,
    }
}

/// Counts the mappings in `/proc/<pid>/maps` text (one non-empty line each).
/// [`ProcReader`] counts the live file in chunks instead, to hold no copy.
#[allow(dead_code)] // API for recorded text; the live path counts chunks.
pub fn count_maps(text: &str) -> u64 {
    text.lines().filter(|l| !l.trim().is_empty()).count() as u64
}

/// Reads samples from `/proc/self`, reusing its buffers between calls so the
/// per-tick path does not allocate once warmed up.
#[derive(Debug, Default)]
pub struct ProcReader {
    status: String,
    chunk: Vec<u8>,
}

/// Chunk size used to count maps lines without holding the whole file.
const MAPS_CHUNK: usize = 64 * 1024;

impl ProcReader {
    /// Creates a reader with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `/proc/self/status` and counts the lines of `/proc/self/maps`.
    pub fn read_sample(&mut self, t_secs: f64, heap: Option<u64>) -> Result<Sample, MemWatchError> {
        self.status.clear();
        File::open(STATUS_PATH)
            .and_then(|mut f| f.read_to_string(&mut self.status))
            .map_err(|source| MemWatchError::Io { path: STATUS_PATH, source })?;
        let status = parse_status(&self.status)?;
        let maps = self.count_maps_file().map_err(|source| MemWatchError::Io { path: MAPS_PATH, source })?;
        Ok(Sample {
            t_secs,
            vm_rss: status.vm_rss,
            rss_anon: status.rss_anon,
            rss_file: status.rss_file,
            rss_shmem: status.rss_shmem,
            maps,
            heap,
        })
    }

    /// Counts newlines of `/proc/self/maps` in fixed-size chunks.
    fn count_maps_file(&mut self) -> std::io::Result<u64> {
        self.chunk.resize(MAPS_CHUNK, 0);
        let mut file = File::open(MAPS_PATH)?;
        let mut lines = 0u64;
        loop {
            let n = match file.read(&mut self.chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            lines += self.chunk[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        Ok(lines)
    }
}

impl Sample {
    /// Field-wise minimum of two reads taken at (about) the same time.
    pub fn floor(&self, o: &Sample) -> Sample {
        Sample {
            t_secs: self.t_secs,
            vm_rss: self.vm_rss.min(o.vm_rss),
            rss_anon: self.rss_anon.min(o.rss_anon),
            rss_file: self.rss_file.min(o.rss_file),
            rss_shmem: self.rss_shmem.min(o.rss_shmem),
            maps: self.maps.min(o.maps),
            heap: match (self.heap, o.heap) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// One-shot convenience: reads a sample with fresh buffers. Prefer keeping a
/// [`ProcReader`] for periodic sampling.
#[allow(dead_code)] // API for one-off callers; MemWatch keeps a ProcReader.
pub fn read_sample(t_secs: f64, heap: Option<u64>) -> Result<Sample, MemWatchError> {
    ProcReader::new().read_sample(t_secs, heap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = include_str!("testdata/status.txt");
    const MAPS: &str = include_str!("testdata/maps.txt");

    #[test]
    fn floor_takes_the_minimum_of_each_field() {
        let a = Sample { t_secs: 1.0, vm_rss: 10, rss_anon: 5, rss_file: 3, rss_shmem: 1, maps: 9, heap: Some(7) };
        let b = Sample { t_secs: 1.1, vm_rss: 8, rss_anon: 6, rss_file: 2, rss_shmem: 4, maps: 9, heap: None };
        let f = a.floor(&b);
        assert_eq!((f.t_secs, f.vm_rss, f.rss_anon, f.rss_file, f.rss_shmem, f.maps, f.heap), (1.0, 8, 5, 2, 1, 9, Some(7)));
    }

    #[test]
    fn parses_recorded_status() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.vm_rss, 22_992 * 1024);
        assert_eq!(s.rss_anon, 12_064 * 1024);
        assert_eq!(s.rss_file, 6_832 * 1024);
        assert_eq!(s.rss_shmem, 4_096 * 1024);
        assert_eq!(s.vm_rss, s.rss_anon + s.rss_file + s.rss_shmem);
    }

    #[test]
    fn malformed_status_is_a_clear_error() {
        let broken = STATUS.replace("VmRSS:\t   22992 kB", "VmRSS:\t   22x92 kB");
        let err = parse_status(&broken).unwrap_err();
        assert!(matches!(err, MemWatchError::MalformedStatus { field: "VmRSS", .. }));
        assert!(err.to_string().contains("VmRSS"), "{err}");

        let wrong_unit = STATUS.replace("RssFile:\t    6832 kB", "RssFile:\t    6832 MB");
        assert!(matches!(parse_status(&wrong_unit), Err(MemWatchError::MalformedStatus { field: "RssFile", .. })));

        let truncated: String = STATUS.lines().take(20).collect::<Vec<_>>().join("\n");
        let err = parse_status(&truncated).unwrap_err();
        assert!(matches!(err, MemWatchError::MissingStatusField { field: "VmRSS" }));
        assert_eq!(err.to_string(), "/proc status has no VmRSS field");

        assert!(parse_status("").is_err());
    }

    #[test]
    fn counts_recorded_maps() {
        assert_eq!(count_maps(MAPS), 38);
        assert_eq!(count_maps(""), 0);
        assert_eq!(count_maps("a\n\nb\n"), 2);
    }

    #[test]
    fn reads_live_sample() {
        let mut reader = ProcReader::new();
        let a = reader.read_sample(0.0, Some(7)).unwrap();
        let b = reader.read_sample(1.0, None).unwrap();
        for s in [&a, &b] {
            assert!(s.vm_rss > 0);
            assert!(s.maps > 0);
            assert!(s.rss_anon + s.rss_file + s.rss_shmem > 0);
        }
        assert_eq!(a.heap, Some(7));
        assert_eq!(b.t_secs, 1.0);
        let one_shot = read_sample(2.0, None).unwrap();
        assert!(one_shot.vm_rss > 0);
    }
}
