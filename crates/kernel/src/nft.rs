//! Runs nft commands: one batch per call, applied as one netlink transaction, and reads
//! portico's table back as JSON (`list table inet portico`). Only ever names table
//! `inet portico`.
//!
//! Two engines, chosen once per process ([`engine`]):
//! - `library` (preferred): libnftables in-process through `sys::nftables` (`dlopen`, no
//!   link-time dependency). No fork, exec and dynamic linking of a process per batch: measured
//!   in `crates/portico/tests/kernel_path.rs`, this is most of a health change's latency. One
//!   context per network namespace (normally one for the process; tests drive several
//!   namespaces from one process), created on the calling thread so that its netlink socket is
//!   in that thread's namespace; calls run on one thread of their own, one at a time
//!   (libnftables has process-global state), at a raised priority (nice -10) so that a
//!   health change's batch does not queue for the CPU behind other work on a busy node.
//! - `command`: `nft -f -` per batch, when the library cannot be loaded, or when the
//!   environment variable `PORTICO_NFT=command` asks for it (to compare the two).
//!
//! A health change's batch (map elements only, [`crate::plan::Batch::Elements`]) skips nft's
//! parser altogether: [`apply_elements`] sends it as one netlink transaction of
//! `NFT_MSG_DELSETELEM` / `NFT_MSG_NEWSETELEM` messages (`sys::nft_set`), the keys and
//! backends encoded as the kernel stores them. libnftables parsed and evaluated each of the
//! ~500 elements and refreshed its cache first: most of a health change's time (a median
//! 12-17 ms and up to 61 ms on the loaded 2-core machine; `crates/portico/tests/kernel_path.rs`
//! prints the figures). `PORTICO_NFT=library` (or `command`) sends them as nft text again, to
//! compare. Table replacements (start, reload) and read-backs stay with nft.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};

use sys::nftables::{Ctx, NftablesError, RunOptions};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::{Duration, Instant};

use crate::plan::TABLE;

/// Most libnftables contexts kept (one per network namespace that ran a batch); the oldest
/// goes first.
pub const MAX_CONTEXTS: usize = 8;

/// Errors of running nft.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NftError {
    /// `nft` could not be started (not installed?).
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(#[source] std::io::Error),
    /// nft refused the batch or the command.
    #[error("nft failed: {0}")]
    Failed(String),
    /// nft's JSON output could not be read.
    #[error("cannot read nft's JSON output: {0}")]
    Json(String),
    /// libnftables could not be used (no context, bad input).
    #[error(transparent)]
    Library(NftablesError),
    /// The nft thread could not take or answer the call.
    #[error("libnftables: {0}")]
    Task(String),
}

/// How nft commands are run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// libnftables in-process.
    Library,
    /// `nft -f -` per batch.
    Command,
}

impl Engine {
    /// `library` or `command` (the log word and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Library => "library",
            Engine::Command => "command",
        }
    }
}

/// The engine of this process and why (decided at the first call).
pub fn engine() -> (Engine, &'static str) {
    static ENGINE: OnceLock<(Engine, String)> = OnceLock::new();
    let (e, why) = ENGINE.get_or_init(|| {
        if std::env::var("PORTICO_NFT").is_ok_and(|v| v == "command") {
            return (Engine::Command, "PORTICO_NFT=command".to_string());
        }
        match sys::nftables::available() {
            Ok(()) => (
                Engine::Library,
                format!("{} loaded in-process", sys::nftables::LIBRARY),
            ),
            Err(e) => (Engine::Command, e.to_string()),
        }
    });
    (*e, why.as_str())
}

/// The network namespace of the calling thread (inode of `/proc/thread-self/ns/net`).
fn netns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

type Shared = Arc<Mutex<Ctx>>;

/// The context of the calling thread's network namespace, created here when missing.
fn context() -> Result<Shared, NftError> {
    static CONTEXTS: Mutex<Vec<(u64, Shared)>> = Mutex::new(Vec::new());
    let ns = netns();
    let mut all = CONTEXTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, c)) = all.iter().find(|(n, _)| *n == ns) {
        return Ok(c.clone());
    }
    let c = Arc::new(Mutex::new(Ctx::new().map_err(NftError::Library)?));
    if all.len() >= MAX_CONTEXTS {
        all.remove(0);
    }
    all.push((ns, c.clone()));
    Ok(c)
}

/// Where the time of one nft call went (the stages of a health change's latency that are
/// the nft call's: the "kernel path applied" log line carries them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// From the call to the nft thread starting it (queued behind another call, or the
    /// thread waiting to be scheduled).
    pub queued: Duration,
    /// libnftables itself (`nft -f -` with the command engine: the whole process).
    pub ran: Duration,
    /// From the nft thread's answer to the caller running again (its task scheduled).
    pub resumed: Duration,
}

/// Runs `commands` with `opts`; returns what nft printed and where the time went.
async fn run(commands: &str, opts: RunOptions) -> Result<(String, Timing), NftError> {
    match engine().0 {
        Engine::Library => {
            let ctx = context()?;
            let (reply, answer) = tokio::sync::oneshot::channel();
            worker()?
                .try_send(Job {
                    ctx,
                    commands: commands.to_string(),
                    opts,
                    sent: Instant::now(),
                    reply,
                })
                .map_err(|_| NftError::Task(format!("more than {QUEUE} nft calls waiting")))?;
            let (out, mut timing, done) = answer
                .await
                .map_err(|_| NftError::Task("the nft thread ended".to_string()))?;
            timing.resumed = done.elapsed();
            let out = out.map_err(|e| match e {
                NftablesError::Refused(t) => NftError::Failed(first_lines(&t)),
                e => NftError::Library(e),
            })?;
            Ok((out, timing))
        }
        Engine::Command => {
            let started = Instant::now();
            let out = run_command(commands, opts).await?;
            Ok((
                out,
                Timing {
                    ran: started.elapsed(),
                    ..Timing::default()
                },
            ))
        }
    }
}

/// Most nft calls waiting for the nft thread (the driver makes one at a time; a full queue
/// fails the call, which the driver counts and retries).
const QUEUE: usize = 16;

/// Nice value of the nft thread: a health change waits for its batch, so on a busy node the
/// batch should not wait behind batch jobs for the CPU.
pub(crate) const NICE: i32 = -10;

/// One libnftables call for the nft thread.
struct Job {
    ctx: Shared,
    commands: String,
    opts: RunOptions,
    /// When the caller queued it.
    sent: Instant,
    /// The output, the call's timing, and when the thread answered.
    reply: tokio::sync::oneshot::Sender<(Result<String, NftablesError>, Timing, Instant)>,
}

/// The thread that runs every libnftables call of the process, one at a time (the library has
/// process-global state), at nice [`NICE`] when allowed.
fn worker() -> Result<&'static std::sync::mpsc::SyncSender<Job>, NftError> {
    static WORKER: OnceLock<Result<std::sync::mpsc::SyncSender<Job>, String>> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
            std::thread::Builder::new()
                .name("portico-nft".to_string())
                .spawn(move || {
                    if let Err(e) = sys::set_thread_nice(NICE) {
                        tracing::info!(error = %e, "kernel path: the nft thread keeps the default priority");
                    }
                    for job in rx {
                        let started = Instant::now();
                        let mut ctx = job.ctx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let out = ctx.run(&job.commands, job.opts);
                        let done = Instant::now();
                        let timing = Timing {
                            queued: started - job.sent,
                            ran: done - started,
                            resumed: Duration::ZERO,
                        };
                        let _ = job.reply.send((out, timing, done));
                    }
                })
                .map(|_| tx)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| NftError::Task(format!("cannot start the nft thread: {e}")))
}

/// First lines only: a failed element batch echoes the whole line.
fn first_lines(err: &str) -> String {
    err.trim().lines().take(4).collect::<Vec<_>>().join(" | ")
}

async fn run_command(commands: &str, opts: RunOptions) -> Result<String, NftError> {
    let mut args = Vec::new();
    if opts.dry_run {
        args.push("-c");
    }
    if opts.json {
        // `nft -j -f -` prints nothing for list commands: they go on the command line (one
        // command, words without quoting, as the list commands here are)
        args.push("-j");
        args.extend(commands.split_whitespace());
    } else {
        args.extend(["-f", "-"]);
    }
    let mut child = Command::new("nft")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let write = stdin.write_all(commands.as_bytes()).await;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(NftError::Failed(if err.trim().is_empty() {
            format!("{}: {:?}", out.status, write.err())
        } else {
            first_lines(&err)
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `batch` as one transaction.
pub async fn apply(batch: &str) -> Result<(), NftError> {
    apply_timed(batch).await.map(drop)
}

/// Applies `batch` as one transaction; says where the time went.
pub async fn apply_timed(batch: &str) -> Result<Timing, NftError> {
    run(batch, RunOptions::default()).await.map(|(_, t)| t)
}

/// `NFPROTO_INET`: the family of table `inet portico`.
const NFPROTO_INET: u8 = 1;

/// Whether map element batches go straight to netlink ([`apply_elements`]): yes unless
/// `PORTICO_NFT` names an nft engine (`library` or `command`) to compare with.
pub fn elements_by_netlink() -> bool {
    static NETLINK: OnceLock<bool> = OnceLock::new();
    *NETLINK.get_or_init(|| {
        std::env::var("PORTICO_NFT").map_or(true, |v| v != "library" && v != "command")
    })
}

/// A map slot as the kernel stores a `numgen … mod N` key: a 32-bit integer in host byte
/// order.
fn push_slot(out: &mut Vec<u8>, slot: u32) {
    out.extend_from_slice(&slot.to_ne_bytes());
}

/// A backend as the kernel stores `ip daddr . tcp dport` (or `ip6 …`) data: the address in
/// network byte order, then the port in network byte order padded to 4 bytes (each field of a
/// concatenation takes whole 32-bit registers).
fn push_backend(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        std::net::IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        std::net::IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.extend_from_slice(&a.port().to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// `changes` as `sys::nft_set` sends them.
pub fn set_changes(changes: &[crate::plan::MapChange]) -> Vec<sys::nft_set::SetChange> {
    changes
        .iter()
        .map(|c| {
            let data_len = match c.add.first() {
                Some((_, a)) if a.is_ipv6() => 20,
                _ => 8,
            };
            let mut delete = Vec::with_capacity(4 * c.delete.len());
            for &i in &c.delete {
                push_slot(&mut delete, i);
            }
            let mut add = Vec::with_capacity((4 + data_len) * c.add.len());
            for &(i, a) in &c.add {
                push_slot(&mut add, i);
                push_backend(&mut add, a);
            }
            sys::nft_set::SetChange {
                set: c.map.clone(),
                key_len: 4,
                data_len,
                delete,
                add,
            }
        })
        .collect()
}

type SharedSocket = Arc<Mutex<sys::nft_set::Socket>>;

/// The element socket of the calling thread's network namespace, opened here when missing
/// (kept open: see [`sys::nft_set::Socket`]).
fn element_socket() -> Result<SharedSocket, NftError> {
    static SOCKETS: Mutex<Vec<(u64, SharedSocket)>> = Mutex::new(Vec::new());
    let ns = netns();
    let mut all = SOCKETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, s)) = all.iter().find(|(n, _)| *n == ns) {
        return Ok(s.clone());
    }
    let s = Arc::new(Mutex::new(
        sys::nft_set::Socket::open().map_err(|e| NftError::Failed(e.to_string()))?,
    ));
    if all.len() >= MAX_CONTEXTS {
        all.remove(0);
    }
    all.push((ns, s.clone()));
    Ok(s)
}

/// Applies map element changes as one netlink transaction (`sys::nft_set`), on the calling
/// thread (its network namespace): the kernel applies the batch within the send, so this
/// blocks only for that (about a millisecond for a thousand slots here).
pub fn apply_elements(changes: &[crate::plan::MapChange]) -> Result<Timing, NftError> {
    let started = Instant::now();
    let sets = set_changes(changes);
    let sock = element_socket()?;
    let mut sock = sock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    sock.apply(NFPROTO_INET, TABLE, &sets)
        .map_err(|e| NftError::Failed(e.to_string()))?;
    Ok(Timing {
        ran: started.elapsed(),
        ..Timing::default()
    })
}

/// Has the kernel check `batch` without applying it (`nft -c`): nothing changes.
pub async fn check(batch: &str) -> Result<(), NftError> {
    run(
        batch,
        RunOptions {
            dry_run: true,
            json: false,
        },
    )
    .await
    .map(drop)
}

/// Runs a list command with JSON output and parses it.
pub(crate) async fn list_json(command: &str) -> Result<serde_json::Value, NftError> {
    let out = run(
        command,
        RunOptions {
            dry_run: false,
            json: true,
        },
    )
    .await?
    .0;
    serde_json::from_str(&out).map_err(|e| NftError::Json(e.to_string()))
}

/// `nft -j list table inet portico` parsed, or `None` when the table does not exist.
pub async fn list() -> Result<Option<serde_json::Value>, NftError> {
    match list_json(&format!("list table inet {TABLE}")).await {
        Ok(v) => Ok(Some(v)),
        Err(NftError::Failed(e)) if e.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a read-back table holds, in the shapes the plan uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Map name → `slot → backend`.
    pub maps: BTreeMap<String, BTreeMap<u32, SocketAddr>>,
    /// Counter name → (packets, bytes).
    pub counters: BTreeMap<String, (u64, u64)>,
    /// Chain names.
    pub chains: Vec<String>,
    /// Number of rules per chain.
    pub rules: BTreeMap<String, usize>,
}

/// Reads the maps, counters, chains and rules out of `nft -j` output.
pub fn parse_table(v: &serde_json::Value) -> Table {
    let mut t = Table::default();
    let items = v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for item in items {
        if let Some(m) = item.get("map") {
            let name = m["name"].as_str().unwrap_or_default().to_string();
            let mut slots = BTreeMap::new();
            for el in m["elem"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let (Some(slot), Some(parts)) = (el[0].as_u64(), el[1]["concat"].as_array()) else {
                    continue;
                };
                let (Some(ip), Some(port)) = (
                    parts.first().and_then(|p| p.as_str()),
                    parts.get(1).and_then(serde_json::Value::as_u64),
                ) else {
                    continue;
                };
                if let (Ok(ip), Ok(port)) = (ip.parse(), u16::try_from(port)) {
                    slots.insert(slot as u32, SocketAddr::new(ip, port));
                }
            }
            t.maps.insert(name, slots);
        } else if let Some(c) = item.get("counter") {
            t.counters.insert(
                c["name"].as_str().unwrap_or_default().to_string(),
                (
                    c["packets"].as_u64().unwrap_or(0),
                    c["bytes"].as_u64().unwrap_or(0),
                ),
            );
        } else if let Some(c) = item.get("chain") {
            t.chains
                .push(c["name"].as_str().unwrap_or_default().to_string());
        } else if let Some(r) = item.get("rule") {
            *t.rules
                .entry(r["chain"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    t
}

/// Reads the table back (`None`: it does not exist).
pub async fn read() -> Result<Option<Table>, NftError> {
    Ok(list().await?.as_ref().map(parse_table))
}

/// The named counters of the table: `nft -j list counters table inet portico`.
pub async fn counters() -> Result<BTreeMap<String, (u64, u64)>, NftError> {
    let v = list_json(&format!("list counters table inet {TABLE}")).await?;
    Ok(parse_table(&v).counters)
}
