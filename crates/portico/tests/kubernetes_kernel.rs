//! Kubernetes mode on the kernel path, end to end: the shipped `portico controller` and
//! `portico agent` binaries against the test API server (`crates/apiserver`), installed the
//! way `deploy/` says, each agent in its own network namespace with IPv4 forwarding on (as on
//! a Kubernetes node). A Service annotated `portico.dev/forwarding: kernel` is served by
//! nftables DNAT: the client reaches its address, the owning agent's `/status` says `kernel`,
//! its node's table `inet portico` maps the address to the EndpointSlice's endpoints, and an
//! endpoint removed from the slice leaves the map; a value that names no data path is refused
//! (`InvalidRequest`, naming the annotation).
//!
//! Network (its own subnet, 10.76.0.0/24, so that it never meets `tests/kubernetes.rs`):
//! namespace `<p>-br` holds bridge `br0`; nodes `<p>-n1..2` (eth0 10.76.0.11-12/24), the
//! controller's pod network `<p>-k0` (10.76.0.50/24), client `<p>-c` (10.76.0.100/24) and a
//! veth into the root namespace (10.76.0.1/24, where the API server listens). The endpoints
//! are HTTP servers in the node namespaces (hostNetwork pods) answering their node's name.
//! Drop guards remove every namespace, link and process.
//!
//! Needs root, `ip`, `arping`, `curl`, `setpriv` and `nft`: without them the test prints
//! `skipped: …` and returns, unless `PORTICO_CI` is set, when it fails.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apiserver::{ApiServer, Options};
use serde_json::{Value, json};
use tokio::time::Instant;

const NAMESPACE_YAML: &str = include_str!("../../../deploy/namespace.yaml");
const CRDS_YAML: &str = include_str!("../../../deploy/crds.yaml");
const RBAC_YAML: &str = include_str!("../../../deploy/rbac.yaml");
const AGENT_YAML: &str = include_str!("../../../deploy/agent.yaml");
const CONTROLLER_YAML: &str = include_str!("../../../deploy/controller.yaml");

const SYSTEM_NS: &str = "portico-system";
const API_IP: &str = "10.76.0.1";
const CLIENT_IP: &str = "10.76.0.100";
const POOL: &str = "10.76.0.200-10.76.0.220";
const BACKEND_PORT: u16 = 8080;
const LB_CLASS: &str = "portico.dev/lb";
const NODES: usize = 2;

fn node_ip(i: usize) -> String {
    format!("10.76.0.{}", 10 + i)
}

/// `true` when the test can run; `false` (after printing why) when it should skip; panics
/// when it cannot run under `PORTICO_CI`.
fn can_run() -> bool {
    let missing = if !sys::is_root() {
        Some("needs root (network namespaces, veth pairs, nftables)".to_string())
    } else {
        ["ip", "arping", "curl", "setpriv", "nft"]
            .iter()
            .find(|t| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .stdout(Stdio::null())
                    .status()
                    .map_or(true, |s| !s.success())
            })
            .map(|t| format!("needs `{t}` (scripts/test-all installs it)"))
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("PORTICO_CI").is_some() => panic!("{why}"),
        Some(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a command run inside namespace `ns` (bounded by the command's own timeout flags).
fn in_ns(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The namespaces of the test; deleting them removes their links (the root end of the veth too).
struct Net {
    prefix: String,
    made: Vec<String>,
    stop_backends: Arc<AtomicBool>,
}

impl Net {
    fn br(&self) -> String {
        format!("{}-br", self.prefix)
    }
    fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }
    fn client(&self) -> String {
        format!("{}-c", self.prefix)
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn create() -> Self {
        let mut net = Net {
            prefix: format!("pkk{}", std::process::id() % 100_000),
            made: Vec::new(),
            stop_backends: Arc::new(AtomicBool::new(false)),
        };
        let br = net.br();
        net.add_ns(&br);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        // The API server's side: a veth from the root namespace into the bridge.
        let root_end = format!("{}api", net.prefix);
        ip(&[
            "-n", &br, "link", "add", "api", "type", "veth", "peer", "name", &root_end, "netns",
            "1",
        ]);
        ip(&["-n", &br, "link", "set", "api", "master", "br0", "up"]);
        ip(&["addr", "add", &format!("{API_IP}/24"), "dev", &root_end]);
        ip(&["link", "set", &root_end, "up"]);
        let mut ends: Vec<(String, String)> = (1..=NODES)
            .map(|i| (net.node(i), format!("{}/24", node_ip(i))))
            .collect();
        ends.push((net.client(), format!("{CLIENT_IP}/24")));
        for (k, (ns, addr)) in ends.iter().enumerate() {
            net.attach(ns, &format!("p{k}"), addr);
        }
        // Kubernetes nodes forward IPv4 (the kernel path DNATs to endpoints on other nodes).
        for i in 1..=NODES {
            let (ok, _) = in_ns(&net.node(i), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            assert!(ok, "ip_forward on node {i}");
        }
        net
    }

    /// A new namespace `ns` on the bridge (bridge port `port`), its eth0 holding `addr`.
    fn attach(&mut self, ns: &str, port: &str, addr: &str) {
        let br = self.br();
        self.add_ns(ns);
        ip(&[
            "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &br, "link", "set", port, "master", "br0", "up"]);
    }

    /// An HTTP endpoint in node `i`'s namespace answering its node name (a hostNetwork pod).
    fn backend(&self, i: usize) {
        let path = format!("/run/netns/{}", self.node(i));
        let stop = self.stop_backends.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            sys::setns_net(&path).expect("setns into the node");
            let l = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], BACKEND_PORT)))
                .expect("backend listens");
            l.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            let body = format!("node-{i}\n");
            // bounded: until the test ends (the flag), at most an hour
            for _ in 0..(3600 * 50) {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("backend started");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_backends.store(true, Ordering::Relaxed);
        // The root end of the API veth goes at once (a deleted namespace's links go later).
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}api", self.prefix)])
            .status();
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// A child process killed (and reaped) on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The manifests are plain YAML documents; the test API server's parser reads them.
fn manifest(yaml: &str) -> Value {
    let docs = apiserver::yaml_documents(yaml).expect("manifest parses");
    docs.into_iter()
        .find(|d| d.is_object())
        .expect("one document")
}

/// Environment of a container in a manifest: `(name, value or fieldRef path)`.
fn manifest_env(yaml: &str) -> Vec<(String, String)> {
    manifest(yaml)["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("the manifest has env")
        .iter()
        .map(|e| {
            let v = e["value"]
                .as_str()
                .or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
                .unwrap_or_default();
            (e["name"].as_str().unwrap_or_default().to_string(), v.into())
        })
        .collect()
}

/// `setpriv` arguments that give the process what the manifest's securityContext gives the
/// container: its user, only the added capabilities (`drop: [ALL]`), no privilege escalation.
fn manifest_security(yaml: &str) -> Vec<String> {
    let doc = manifest(yaml);
    let pod = &doc["spec"]["template"]["spec"];
    let sc = &pod["containers"][0]["securityContext"];
    let uid = sc["runAsUser"]
        .as_u64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
        .unwrap_or(0)
        .to_string();
    let mut caps = "-all".to_string();
    for c in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        caps.push_str(&format!(
            ",+{}",
            c.as_str().unwrap_or_default().to_lowercase()
        ));
    }
    let mut args: Vec<String> = [
        "setpriv",
        "--reuid",
        &uid,
        "--regid",
        &uid,
        "--clear-groups",
        "--bounding-set",
        &caps,
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    if sc["allowPrivilegeEscalation"] == false {
        args.push("--no-new-privs".into());
    }
    args.push("--".into());
    args
}

fn manifest_args(yaml: &str) -> Vec<String> {
    manifest(yaml)["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the manifest has args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

/// A running cluster: API server, controller, agents, network.
struct Cluster {
    // Field order is drop order: processes first, then the network, then the server.
    procs: Vec<Proc>,
    net: Net,
    server: ApiServer,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!("--- {} (last lines) ---\n{}", p.name, p.log_tail());
            }
        }
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Cluster {
    /// Installs portico as docs/kubernetes.md says and starts the controller and the agents.
    async fn start() -> Self {
        let net = Net::create();
        let server = ApiServer::start(Options {
            bind: format!("{API_IP}:0").parse().expect("address"),
            ..Options::default()
        })
        .await
        .expect("API server starts");
        let dir = std::env::temp_dir().join(format!("portico-k8s-{}", net.prefix));
        std::fs::create_dir_all(&dir).expect("temp dir");
        server.apply_yaml(NAMESPACE_YAML).expect("namespace.yaml");
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(41).wrapping_add(std::process::id() as u8))
            .collect();
        let key_b64 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&key)
        };
        server
            .inject(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "portico-gossip", "namespace": SYSTEM_NS},
                "type": "Opaque", "data": {"key": b64(&key_b64)},
            }))
            .expect("gossip Secret");
        server.apply_yaml(CRDS_YAML).expect("crds.yaml");
        server.apply_yaml(RBAC_YAML).expect("rbac.yaml");
        for i in 1..=NODES {
            server
                .inject(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}"), "kubernetes.io/os": "linux"}},
                    "spec": {},
                    "status": {
                        "addresses": [{"type": "InternalIP", "address": node_ip(i)}, {"type": "Hostname", "address": format!("node-{i}")}],
                        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                    },
                }))
                .expect("Node");
        }
        server
            .inject(json!({
                "apiVersion": "portico.dev/v1alpha1", "kind": "IPPool",
                "metadata": {"name": "default"}, "spec": {"addresses": [POOL]},
            }))
            .expect("IPPool");
        let kubeconfig = |sa: &str| {
            let path = dir.join(format!("{sa}.kubeconfig"));
            std::fs::write(&path, server.service_account_kubeconfig(SYSTEM_NS, sa))
                .expect("kubeconfig");
            path
        };
        let (controller_kc, agent_kc) = (
            kubeconfig("portico-controller"),
            kubeconfig("portico-agent"),
        );
        let mut c = Cluster {
            procs: Vec::new(),
            net,
            server,
            dir,
        };
        // the controller in its own pod network (it is not hostNetwork)
        let pod_ns = format!("{}-k0", c.net.prefix);
        c.net.attach(&pod_ns, "k0", "10.76.0.50/24");
        let p = c.spawn(
            "portico-controller-0",
            &pod_ns,
            CONTROLLER_YAML,
            ("", "10.76.0.50"),
            &controller_kc,
        );
        c.procs.push(p);
        for i in 1..=NODES {
            c.net.backend(i);
            let ns = c.net.node(i);
            let p = c.spawn(
                &format!("agent-node-{i}"),
                &ns,
                AGENT_YAML,
                (&format!("node-{i}"), &node_ip(i)),
                &agent_kc,
            );
            c.procs.push(p);
        }
        c
    }

    /// `portico <args of the manifest>` in namespace `ns` with the manifest's env (downward
    /// API values filled in as the kubelet would), user and capabilities.
    fn spawn(
        &self,
        name: &str,
        ns: &str,
        manifest: &str,
        (node, host_ip): (&str, &str),
        kubeconfig: &PathBuf,
    ) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut argv: Vec<String> = ["ip", "netns", "exec", ns].map(String::from).to_vec();
        argv.extend(manifest_security(manifest));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).arg(env!("CARGO_BIN_EXE_portico"));
        cmd.args(manifest_args(manifest));
        for (k, v) in manifest_env(manifest) {
            let value = match v.as_str() {
                "spec.nodeName" => node.to_string(),
                "metadata.namespace" => SYSTEM_NS.to_string(),
                "metadata.name" => name.to_string(),
                "status.hostIP" | "status.podIP" => host_ip.to_string(),
                other => other.to_string(),
            };
            cmd.env(k, value);
        }
        cmd.env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        Proc {
            name: name.to_string(),
            child: cmd.spawn().expect("portico starts"),
            log,
        }
    }

    /// Creates or replaces the LoadBalancer Service `ns/name` of portico's class on port 80
    /// with `annotations`, and its EndpointSlice with a ready endpoint on each of `nodes`.
    fn service(&self, ns: &str, name: &str, annotations: Value, nodes: &[usize]) {
        if self.server.get("v1", "Namespace", None, ns).is_none() {
            self.server
                .inject(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("namespace");
        }
        self.server
            .inject(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {"type": "LoadBalancer", "loadBalancerClass": LB_CLASS, "selector": {"app": name},
                         "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}]},
            }))
            .expect("Service");
        let endpoints: Vec<Value> = nodes
            .iter()
            .map(|&i| {
                json!({
                    "addresses": [node_ip(i)],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": format!("node-{i}"),
                })
            })
            .collect();
        self.server
            .inject(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .expect("EndpointSlice");
    }

    /// The Service's ingress address, once the controller wrote it (bounded wait).
    async fn wait_address(&self, ns: &str, name: &str) -> String {
        wait_for(&format!("{ns}/{name}'s address"), 30, || {
            let svc = self.server.get("v1", "Service", Some(ns), name)?;
            svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
        .await
    }

    /// The node (1-based) whose eth0 MAC answers ARP for `vip` from the client, once exactly
    /// one does (bounded wait).
    async fn wait_owner(&self, vip: &str) -> usize {
        let mac = wait_for(&format!("one node answering ARP for {vip}"), 30, || {
            let (_, out) = in_ns(
                &self.net.client(),
                &[
                    "arping", "-c", "3", "-W", "0.3", "-w", "2", "-i", "eth0", vip,
                ],
            );
            let macs: BTreeSet<String> = out
                .lines()
                .filter(|l| l.contains("bytes from"))
                .filter_map(|l| l.split_whitespace().nth(3).map(str::to_lowercase))
                .collect();
            (macs.len() == 1).then(|| macs.into_iter().next().unwrap_or_default())
        })
        .await;
        (1..=NODES)
            .find(|i| {
                let (_, out) = in_ns(&self.net.node(*i), &["cat", "/sys/class/net/eth0/address"]);
                out.trim().eq_ignore_ascii_case(&mac)
            })
            .unwrap_or_else(|| panic!("{mac} is no node's MAC"))
    }

    /// `curl http://vip/` from the client: the answering endpoint's node name.
    fn curl(&self, vip: &str) -> Option<String> {
        let (ok, out) = in_ns(
            &self.net.client(),
            &["curl", "-s", "-m", "2", &format!("http://{vip}/")],
        );
        ok.then(|| out.trim().to_string())
    }

    /// Node `i`'s agent `/status`, parsed.
    fn status(&self, i: usize) -> Value {
        let (_, out) = in_ns(
            &self.net.node(i),
            &["curl", "-s", "-m", "2", "http://127.0.0.1:9440/status"],
        );
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    /// The backends (`addr:port`) in the maps of node `i`'s table `inet portico`, read back
    /// with `nft -j list table inet portico` in its namespace (`None` without the table).
    fn map_backends(&self, i: usize) -> Option<BTreeSet<String>> {
        let (ok, out) = in_ns(
            &self.net.node(i),
            &["nft", "-j", "list", "table", "inet", "portico"],
        );
        if !ok {
            return None;
        }
        let v: Value = serde_json::from_str(&out).ok()?;
        let mut set = BTreeSet::new();
        for item in v["nftables"].as_array()? {
            for el in item["map"]["elem"].as_array().into_iter().flatten() {
                let parts = &el[1]["concat"];
                if let (Some(ip), Some(port)) = (parts[0].as_str(), parts[1].as_u64()) {
                    set.insert(format!("{ip}:{port}"));
                }
            }
        }
        Some(set)
    }
}

/// Polls `f` every 100 ms until it gives a value, for at most `secs`.
async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out ({secs} s) waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_service_runs_on_the_kernel_path_and_follows_its_endpoint_slice() {
    if !can_run() {
        return;
    }
    let c = Cluster::start().await;
    c.service(
        "shop",
        "web",
        json!({"portico.dev/forwarding": "kernel"}),
        &[1, 2],
    );
    // a value that names no data path is refused, and the refusal names the annotation
    c.service(
        "shop",
        "bad",
        json!({"portico.dev/forwarding": "fast"}),
        &[1],
    );
    let vip = c.wait_address("shop", "web").await;
    let owner = c.wait_owner(&vip).await;
    let refusal = wait_for("shop/bad refused", 20, || {
        let svc = c.server.get("v1", "Service", Some("shop"), "bad")?;
        svc["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|k| k["type"] == "portico.dev/AddressAllocated" && k["status"] == "False")
            .cloned()
    })
    .await;
    assert_eq!(refusal["reason"], "InvalidRequest", "{refusal}");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("portico.dev/forwarding") && message.contains("`fast`"),
        "{refusal}"
    );

    // the owning agent runs it on the kernel path, as the annotation asked
    let status = wait_for("the owner's /status naming shop/web", 20, || {
        let st = c.status(owner);
        let svc = st["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "shop/web")?
            .clone();
        Some(svc)
    })
    .await;
    assert_eq!(
        (status["path"].as_str(), status["path_reason"].as_str()),
        (Some("kernel"), Some("configured")),
        "{status:#}"
    );

    // its table maps the address to both endpoints
    let both: BTreeSet<String> = (1..=NODES)
        .map(|i| format!("{}:{BACKEND_PORT}", node_ip(i)))
        .collect();
    wait_for("both endpoints in the owner's map", 20, || {
        (c.map_backends(owner)? == both).then_some(())
    })
    .await;

    // the client reaches the address, and both endpoints answer through the kernel's DNAT
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        if let Some(b) = c.curl(&vip).filter(|b| !b.is_empty()) {
            seen.insert(b);
        }
        if seen.len() == NODES {
            break;
        }
    }
    assert_eq!(
        seen,
        (1..=NODES).map(|i| format!("node-{i}")).collect(),
        "both endpoints answer through {vip}"
    );

    // an endpoint removed from the EndpointSlice leaves the map; the other still answers
    c.service(
        "shop",
        "web",
        json!({"portico.dev/forwarding": "kernel"}),
        &[1],
    );
    let one: BTreeSet<String> = [format!("{}:{BACKEND_PORT}", node_ip(1))].into();
    wait_for("node-2's endpoint out of the owner's map", 20, || {
        (c.map_backends(owner)? == one).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(c.curl(&vip).as_deref(), Some("node-1"));
    }

    // `proxy` moves it off the kernel path: the proxy serves, the table has no map for it
    c.service(
        "shop",
        "web",
        json!({"portico.dev/forwarding": "proxy"}),
        &[1],
    );
    wait_for("shop/web on the proxy", 20, || {
        let st = c.status(owner);
        st["services"]
            .as_array()?
            .iter()
            .any(|s| {
                s["name"] == "shop/web" && s["path"] == "proxy" && s["path_reason"] == "configured"
            })
            .then_some(())
    })
    .await;
    wait_for("no map left on the owner", 20, || {
        c.map_backends(owner)
            .is_none_or(|m| m.is_empty())
            .then_some(())
    })
    .await;
    let answered = wait_for("the proxy answering", 10, || {
        c.curl(&vip).filter(|b| !b.is_empty())
    })
    .await;
    assert_eq!(answered, "node-1");
    println!(
        "{vip} owned by node-{owner}: kernel path with both endpoints answering ({seen:?}), \
         one after the slice lost node-2, then the proxy"
    );
}
