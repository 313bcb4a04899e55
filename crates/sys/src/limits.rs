//! Process resource limits and local resource shortages.
//!
//! * [`raise_nofile_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start (the
//!   common soft default of 1,024 descriptors is far below what a load balancer needs) and
//!   returns the limit now in force; [`nofile_limit`] reads it.
//! * [`is_local_resource_error`] tells a shortage on *this* node (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`) from a failure of the peer: a health check or connect that fails with one of these
//!   says nothing about the backend.
//! * [`LogEvery`] lets a repeating condition be logged once per interval with the count of what
//!   was suppressed in between.
//! * [`memory_limit`] reads the memory this process may use: the machine's (`MemTotal`), or its
//!   cgroup's limit (`memory.max`, cgroup v2) when that is lower, as in a container. Pools that
//!   grow with the machine (the io_uring relay's buffers) are sized from it.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::time::{Duration, Instant};

/// The soft limit on open file descriptors now in force (`RLIMIT_NOFILE`); `u64::MAX` when
/// unlimited.
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (`u64::MAX` when unlimited). When the hard limit is unlimited the soft limit is raised to
/// `fs.nr_open` (the kernel refuses more), or left as it is if that cannot be read.
pub fn raise_nofile_limit() -> Result<u64, crate::Error> {
    let now = getrlimit(Resource::Nofile);
    let target = match now.maximum {
        Some(hard) => hard,
        None => match crate::sysctl_read("fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(n) => n,
            None => return Ok(now.current.unwrap_or(u64::MAX)),
        },
    };
    if now.current.is_some_and(|soft| soft >= target) || now.current.is_none() {
        return Ok(now.current.unwrap_or(u64::MAX));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: now.maximum,
        },
    )
    .map_err(|e| crate::Error::Io {
        what: "setrlimit(RLIMIT_NOFILE)",
        source: e.into(),
    })?;
    Ok(nofile_limit())
}

/// Sets the soft `RLIMIT_NOFILE` of this process (tests lower it in a child process).
pub fn set_nofile_soft_limit(soft: u64) -> Result<(), crate::Error> {
    let now = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: now.maximum,
        },
    )
    .map_err(|e| crate::Error::Io {
        what: "setrlimit(RLIMIT_NOFILE)",
        source: e.into(),
    })
}

/// Whether `e` is a shortage of this node's resources (`EMFILE`: the process is out of file
/// descriptors, `ENFILE`: the system is, `ENOBUFS` / `ENOMEM`: out of kernel memory) rather than
/// a failure of the peer.
pub fn is_local_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Lets a repeating event through once per interval: the first call passes, later calls within
/// the interval are counted and suppressed, and the next call that passes reports how many were
/// suppressed. Cheap enough for an accept loop.
#[derive(Debug)]
pub struct LogEvery {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogEvery {
    /// At most one pass per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last pass)` when this event should be logged now, else
    /// `None` (and the event is counted as suppressed).
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| now.saturating_duration_since(l) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// The memory this process may use, in bytes: the lower of the machine's (`MemTotal` in
/// `/proc/meminfo`) and its cgroup's limit (`memory.max` of the cgroup v2 named in
/// `/proc/self/cgroup`, when it is set); `None` when neither can be read.
pub fn memory_limit() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_total(&s));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| cgroup_v2_path(&s).map(str::to_owned))
        .and_then(|p| std::fs::read_to_string(format!("/sys/fs/cgroup{p}/memory.max")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib = line["MemTotal:".len()..].trim().strip_suffix("kB")?.trim();
    kib.parse::<u64>().ok()?.checked_mul(1024)
}

/// The cgroup v2 path (`0::/path`) of a `/proc/self/cgroup` text.
fn cgroup_v2_path(cgroup: &str) -> Option<&str> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/') && !p.contains(".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_meminfo_and_the_cgroup_v2_path() {
        let meminfo = "MemTotal:       24591212 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_591_212 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(
            cgroup_v2_path("0::/system.slice/portico.service\n"),
            Some("/system.slice/portico.service")
        );
        assert_eq!(cgroup_v2_path("12:memory:/x\n0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("12:memory:/x\n"), None);
        assert_eq!(cgroup_v2_path("0::/../etc\n"), None);
        // This machine: something is read, and never more than the machine has.
        let machine = mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap()).unwrap();
        let limit = memory_limit().unwrap();
        assert!(limit > 0 && limit <= machine, "{limit} of {machine}");
    }

    #[test]
    fn local_resource_errors_are_told_from_peer_failures() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_local_resource_error(&io::Error::from_raw_os_error(
                errno
            )));
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(!is_local_resource_error(&io::Error::from_raw_os_error(
                errno
            )));
        }
    }

    #[test]
    fn log_every_passes_once_per_interval_and_counts_the_rest() {
        let every = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(every.check(t0), Some(0));
        for i in 1..=200u64 {
            assert_eq!(every.check(t0 + Duration::from_millis(i * 45)), None);
        }
        assert_eq!(every.check(t0 + Duration::from_secs(10)), Some(200));
        assert_eq!(every.check(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn raising_the_limit_reaches_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum;
        let got = raise_nofile_limit().expect("raise");
        assert_eq!(got, nofile_limit());
        if let Some(hard) = hard {
            assert_eq!(got, hard);
        }
    }
}
