//! A real single-node Slurm for the launch tests: Debian's munged, slurmctld
//! and slurmd run as root on free loopback ports, configured entirely inside
//! a temporary folder (own munge key and socket, state, spool, logs); the
//! Slurm commands it runs get that configuration through `SLURM_CONF`. No
//! cgroups, no accounting: a job's state and exit code come from `scontrol
//! show job`. Dropping it cancels what still runs, stops the daemons and
//! removes the folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::free_port;

/// The daemons and the commands the cluster needs (Debian 12: `slurm-wlm`
/// and `munge`; scripts/setup installs them).
const PROGRAMS: [&str; 9] = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo"];

/// One controller and one compute node (this host), in `dir`.
#[derive(Debug)]
pub struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    /// This host's short name: the only node, in the partition `kvrail`.
    pub node: String,
    /// The node's CPUs (as configured: the machine's).
    pub cpus: usize,
    daemons: Vec<(&'static str, Child)>,
}

/// How a job ended, from `scontrol show job`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    /// COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    pub state: String,
    /// The batch script's exit code (`ExitCode=CODE:SIGNAL`).
    pub exit_code: i32,
    /// The signal that ended it, 0 if none.
    pub signal: i32,
}

impl Slurm {
    /// Brings the cluster up and waits (at most 30 s) until its node is
    /// idle. Panics, saying what is missing, without root or without Slurm
    /// and munge installed.
    pub fn start(tag: &str) -> Slurm {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string));
        assert_eq!(uid.as_deref(), Some("0"), "the Slurm test runs slurmctld, slurmd and munged as root: run it as root (uid is {uid:?})");
        let missing: Vec<&str> = PROGRAMS.iter().copied().filter(|p| which(p).is_none()).collect();
        assert!(missing.is_empty(), "not installed: {} (Debian's slurm-wlm and munge; scripts/setup installs them)", missing.join(", "));

        let dir = std::env::temp_dir().join(format!("kvrail-slurm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["", "munge", "run", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create the Slurm folder");
        }
        // munged wants its key private and its socket's folders searchable
        // by everyone.
        set_mode(&dir, 0o755);
        set_mode(&dir.join("run"), 0o755);
        set_mode(&dir.join("munge"), 0o700);
        let node = short_hostname();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = dir.join("slurm.conf");
        let mut s = Slurm { dir, conf, node, cpus, daemons: Vec::new() };

        let key = s.dir.join("munge/munge.key");
        let out = Command::new(which("mungekey").unwrap()).arg("--create").arg("--keyfile").arg(&key).output().expect("run mungekey");
        assert!(out.status.success(), "mungekey --create failed: {}", String::from_utf8_lossy(&out.stderr));
        let socket = s.dir.join("run/munge.sock");
        let mut munged = Command::new(which("munged").unwrap());
        munged
            .arg("--foreground")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", s.dir.join("run/munged.pid").display()))
            .arg(format!("--log-file={}", s.dir.join("log/munged.log").display()))
            .arg(format!("--seed-file={}", s.dir.join("munge/munged.seed").display()));
        s.spawn("munged", munged);
        s.wait_for("munged's socket", Duration::from_secs(10), |s| s.dir.join("run/munge.sock").exists().then_some(()));

        std::fs::write(&s.conf, s.config(&socket, free_port(), free_port())).expect("write slurm.conf");
        let mut ctld = Command::new(which("slurmctld").unwrap());
        ctld.arg("-D").arg("-i").arg("-f").arg(&s.conf);
        s.spawn("slurmctld", ctld);
        let mut slurmd = Command::new(which("slurmd").unwrap());
        slurmd.arg("-D").arg("-N").arg(&s.node).arg("-f").arg(&s.conf);
        s.spawn("slurmd", slurmd);
        s.wait_for("the node to be idle (sinfo)", Duration::from_secs(30), |s| {
            let out = s.command("sinfo").args(["-h", "-n", &s.node, "-o", "%t"]).output().ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "idle").then_some(())
        });
        s
    }

    fn config(&self, munge_socket: &Path, ctld_port: u16, slurmd_port: u16) -> String {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let node = &self.node;
        format!(
            "# A single-node cluster for kvrail's tests, all of it in {dir}.
ClusterName=kvrail-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={slurmd_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={slurmd_log}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=kvrail Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
",
            dir = self.dir.display(),
            socket = munge_socket.display(),
            state = d("state"),
            spool = d("spool"),
            ctld_pid = d("run/slurmctld.pid"),
            slurmd_pid = d("run/slurmd.pid"),
            ctld_log = d("log/slurmctld.log"),
            slurmd_log = d("log/slurmd.log"),
            cpus = self.cpus,
        )
    }

    /// The cluster's folder (a job's files can go here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A Slurm command (`sbatch`, `scontrol`, ...) talking to this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(which(program).unwrap_or_else(|| PathBuf::from(program)));
        c.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        c
    }

    /// `sbatch --parsable ARGS SCRIPT` with `env` added; the job's id.
    pub fn sbatch(&self, script: &Path, args: &[&str], env: &[(&str, &str)]) -> u32 {
        let mut c = self.command("sbatch");
        c.arg("--parsable").args(args).arg(script);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run sbatch");
        assert!(out.status.success(), "sbatch {args:?} {} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().split(';').next().unwrap_or("").parse().unwrap_or_else(|_| panic!("sbatch printed no job id: {text:?}"))
    }

    /// `scontrol show job ID` as one line (`None`: no such job).
    pub fn show_job(&self, job: u32) -> Option<String> {
        let out = self.command("scontrol").args(["show", "job", "--oneliner", &job.to_string()]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// How `job` ended, `None` while it is pending or running.
    pub fn job_ended(&self, job: u32) -> Option<JobEnd> {
        self.show_job(job).as_deref().and_then(job_end)
    }

    /// Waits until `job` has ended (at most `limit`; then it is cancelled
    /// and this panics with the daemons' log tails).
    pub fn wait_job(&self, job: u32, limit: Duration) -> JobEnd {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(end) = self.job_ended(job) {
                return end;
            }
            if Instant::now() > deadline {
                let _ = self.command("scancel").arg(job.to_string()).output();
                panic!("job {job} did not end within {limit:?}: {}\n{}", self.show_job(job).unwrap_or_default(), self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of slurmctld's and slurmd's logs.
    pub fn log_tails(&self) -> String {
        ["slurmctld", "slurmd"]
            .iter()
            .map(|d| format!("{d}.log:\n{}", tail(&self.dir.join(format!("log/{d}.log")), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) {
        let out = std::fs::File::create(self.dir.join(format!("log/{name}.out"))).expect("daemon output file");
        let err = out.try_clone().expect("daemon output file");
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// Polls `ready` every 100 ms until it answers, failing at once if a
    /// daemon exits, and after `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration, ready: impl Fn(&Slurm) -> Option<()>) {
        let deadline = Instant::now() + limit;
        loop {
            if ready(self).is_some() {
                return;
            }
            let exited = self.daemons.iter_mut().find_map(|(name, child)| child.try_wait().ok().flatten().map(|st| (*name, st)));
            if let Some((name, st)) = exited {
                let out = tail(&self.dir.join(format!("log/{name}.out")), 15);
                panic!("{name} exited ({st}) while waiting for {what}; its output:\n{out}\n{}", self.log_tails());
            }
            assert!(Instant::now() < deadline, "no {what} within {limit:?}\n{}", self.log_tails());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Jobs first (their steps belong to slurmd), at most 15 s.
        if self.daemons.iter().any(|(n, _)| *n == "slurmctld") {
            let _ = self.command("scancel").args(["--user", "root"]).output();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                let out: Option<Output> = self.command("squeue").args(["-h", "-o", "%i"]).output().ok();
                if out.is_none_or(|o| !o.status.success() || o.stdout.is_empty()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // slurmd, slurmctld, then munged: SIGTERM, at most 5 s, then SIGKILL.
        while let Some((_, mut child)) = self.daemons.pop() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `JobState=... ExitCode=C:S` of an ended job; `None` while it is pending
/// or running.
fn job_end(line: &str) -> Option<JobEnd> {
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k));
    let state = field("JobState=")?.to_string();
    if ["PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"].contains(&state.as_str()) {
        return None;
    }
    let (code, signal) = field("ExitCode=")?.split_once(':')?;
    Some(JobEnd { state, exit_code: code.parse().ok()?, signal: signal.parse().ok()? })
}

/// A program on PATH or in the sbin folders (where Debian puts the daemons).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]).map(|d| Path::new(d).join(program)).find(|p| p.is_file());
    found
}

fn short_hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("read the host name");
    h.trim().split('.').next().unwrap_or("localhost").to_string()
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("set permissions");
}

/// The last `n` lines of a file.
pub fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_ends_on_its_final_state_with_its_exit_code() {
        let running = "JobId=3 JobName=x JobState=RUNNING Reason=None ExitCode=0:0 RunTime=00:00:02";
        assert_eq!(job_end(running), None);
        let done = "JobId=3 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0 RunTime=00:00:02";
        assert_eq!(job_end(done), Some(JobEnd { state: "FAILED".into(), exit_code: 1, signal: 0 }));
        let ok = "JobId=4 JobState=COMPLETED Reason=None Dependency=(null) ExitCode=0:0";
        assert_eq!(job_end(ok).map(|e| e.exit_code), Some(0));
    }
}
