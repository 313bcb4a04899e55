//! Runs `nft`: one batch per `nft -f -` (nft applies a file as one netlink transaction), and
//! reads portico's table back as JSON (`nft -j list table inet portico`). Only ever names table
//! `inet portico`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::plan::TABLE;

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
}

/// Applies `batch` as one transaction.
pub async fn apply(batch: &str) -> Result<(), NftError> {
    run(&["-f", "-"], batch).await
}

/// Has the kernel check `batch` without applying it (`nft -c`): nothing changes.
pub async fn check(batch: &str) -> Result<(), NftError> {
    run(&["-c", "-f", "-"], batch).await
}

async fn run(args: &[&str], batch: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let write = stdin.write_all(batch.as_bytes()).await;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        return Err(NftError::Failed(if err.is_empty() {
            format!("{}: {:?}", out.status, write.err())
        } else {
            // first lines only: a failed element batch echoes the whole line
            err.lines().take(4).collect::<Vec<_>>().join(" | ")
        }));
    }
    Ok(())
}

/// `nft -j list table inet portico` parsed, or `None` when the table does not exist.
pub async fn list() -> Result<Option<serde_json::Value>, NftError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::Failed(err.trim().to_string()));
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| NftError::Json(e.to_string()))
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
    let out = Command::new("nft")
        .args(["-j", "list", "counters", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NftError::Json(e.to_string()))?;
    Ok(parse_table(&v).counters)
}
