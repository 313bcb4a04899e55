//! Allocation under a burst: N LoadBalancer Services created at once against the test API
//! server, served by the shipped `portico controller` process. Run by `bench/alloc.sh`.
//!
//! The Services are created through the API over HTTPS (kube-rs, the admin user, `CONCURRENCY`
//! requests in flight), as `kubectl apply` of many objects would; the controller runs as its
//! own process with the ServiceAccount and RBAC of `deploy/`. Per Service the time from its
//! create's response to the address appearing in `status.loadBalancer.ingress` is taken from
//! the server's change history (looked at every 5 ms in process: no watch delay is added and
//! no Service is copied). Printed:
//! p50/p90/p99/max create→address, the span from the last create to the last address, and the
//! controller's API requests per allocation (the figure that carries over to a real cluster).
//!
//! Arguments: `<portico binary> [services] [rounds]`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use apiserver::{ApiServer, Options};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::time::Instant;

const NAMESPACE_YAML: &str = include_str!("../../../deploy/namespace.yaml");
const CRDS_YAML: &str = include_str!("../../../deploy/crds.yaml");
const RBAC_YAML: &str = include_str!("../../../deploy/rbac.yaml");
const CONCURRENCY: usize = 64;
const SYSTEM_NS: &str = "portico-system";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn controller_requests(server: &ApiServer) -> u64 {
    server
        .requests()
        .into_iter()
        .filter(|(k, _)| k.contains("portico-controller"))
        .map(|(_, n)| n)
        .sum()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is index 0, utime 11, stime 12 (stat(5) fields 14, 15).
    (ticks(11) + ticks(12)) / 100.0
}

async fn round(portico: &str, services: usize, r: usize) -> anyhow::Result<()> {
    let server = ApiServer::start(Options {
        history: 100_000,
        ..Options::default()
    })
    .await?;
    server.apply_yaml(NAMESPACE_YAML)?;
    server.apply_yaml(CRDS_YAML)?;
    server.apply_yaml(RBAC_YAML)?;
    server
        .inject(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}))?;
    server.inject(json!({
        "apiVersion": "portico.dev/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "burst"}, "spec": {"addresses": ["198.18.0.0/20"]},
    }))?;
    let dir = tempdir(r)?;
    let controller_kc = dir.join("controller.kubeconfig");
    std::fs::write(
        &controller_kc,
        server.service_account_kubeconfig(SYSTEM_NS, "portico-controller"),
    )?;
    let admin_kc = dir.join("admin.kubeconfig");
    std::fs::write(&admin_kc, server.admin_kubeconfig())?;

    // The controller, as deploy/controller.yaml runs it.
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let mut child = Command::new(portico)
        .args(["controller", "--metrics-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &controller_kc)
        .env("POD_NAMESPACE", SYSTEM_NS)
        .env("POD_NAME", format!("portico-controller-{r}"))
        .env("RUST_LOG", "warn")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let pid = child.id();
    // Ready: it holds the Lease.
    let until = Instant::now() + Duration::from_secs(30);
    while server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(SYSTEM_NS),
            "portico-controller",
        )
        .is_none_or(|l| l["spec"]["holderIdentity"].is_null())
    {
        anyhow::ensure!(
            Instant::now() < until,
            "the controller took no Lease in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&admin_kc)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let api: Api<Service> = Api::namespaced(client, "bench");
    let requests_before = controller_requests(&server);
    let cpu_before = cpu_seconds(pid);

    // Create them all, CONCURRENCY in flight; remember when each create returned.
    let created: Arc<tokio::sync::Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let names: Vec<String> = (0..services).map(|i| format!("svc-{i:04}")).collect();
    let queue = Arc::new(tokio::sync::Mutex::new(names.clone()));
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (api, queue, created) = (api.clone(), queue.clone(), created.clone());
        workers.spawn(async move {
            loop {
                let Some(name) = queue.lock().await.pop() else {
                    return Ok::<(), kube::Error>(());
                };
                let svc: Service = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "bench"},
                    "spec": {"type": "LoadBalancer", "loadBalancerClass": "portico.dev/lb",
                             "selector": {"app": name},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
                }))
                .expect("a valid Service");
                api.create(&PostParams::default(), &svc).await?;
                created.lock().await.insert(name, Instant::now());
            }
        });
    }
    // Meanwhile, note when each address shows up in the store.
    let mut addressed: BTreeMap<String, Instant> = BTreeMap::new();
    let mut seen_rv = server.with_store(|s| s.rv());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut creating = true;
    while addressed.len() < services && Instant::now() < deadline {
        if creating {
            while let Some(done) = workers.try_join_next() {
                done??;
            }
            creating = !workers.is_empty();
        }
        // Only the store's changes since the last look (no copies of every Service).
        let now = Instant::now();
        seen_rv = server.with_store(|s| {
            if let Ok(changes) = s.changes_after(seen_rv) {
                for e in changes {
                    if e.key.plural == "services"
                        && e.object["status"]["loadBalancer"]["ingress"][0]["ip"].is_string()
                    {
                        addressed.entry(e.key.name.clone()).or_insert(now);
                    }
                }
            }
            s.rv()
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let created = created.lock().await.clone();
    let last_create = created.values().max().copied().unwrap_or(t0);
    let mut waits: Vec<Duration> = created
        .iter()
        .filter_map(|(n, c)| addressed.get(n).map(|a| a.saturating_duration_since(*c)))
        .collect();
    waits.sort();
    let last_address = addressed.values().max().copied().unwrap_or(t0);
    let requests = controller_requests(&server) - requests_before;
    let cpu = cpu_seconds(pid) - cpu_before;
    println!(
        "round {r}: {services} Services created in {:.2} s; addressed {}/{services}; create->address p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms; last address {:.0} ms after the last create; controller: {:.2} API requests per allocation, {:.2} ms CPU per allocation; load {}",
        last_create.saturating_duration_since(t0).as_secs_f64(),
        addressed.len(),
        percentile(&waits, 0.5).as_secs_f64() * 1e3,
        percentile(&waits, 0.9).as_secs_f64() * 1e3,
        percentile(&waits, 0.99).as_secs_f64() * 1e3,
        waits.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        last_address
            .saturating_duration_since(last_create)
            .as_secs_f64()
            * 1e3,
        requests as f64 / addressed.len().max(1) as f64,
        cpu * 1e3 / addressed.len().max(1) as f64,
        loadavg(),
    );
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    if !warnings.is_empty() {
        println!(
            "round {r}: the controller logged {} warnings/errors, first: {}",
            warnings.len(),
            warnings[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        addressed.len() == services,
        "not every Service got an address in 120 s"
    );
    Ok(())
}

fn tempdir(r: usize) -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("portico-alloc-{}-{r}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let portico = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: alloc_burst <portico binary> [services] [rounds]")
    })?;
    let services: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    for r in 1..=rounds {
        round(&portico, services, r).await?;
    }
    Ok(())
}
