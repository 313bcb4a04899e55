//! The Kubernetes end-to-end harness shared by `tests/kubernetes.rs` and
//! `tests/kubernetes_kernel.rs`: the test API server with portico installed from `deploy/`,
//! the shipped controller and agents (each agent in its own network namespace on a bridge),
//! a client namespace and HTTP endpoints on the nodes. See `tests/kubernetes.rs` for the
//! network. Every namespace, link and process is removed by Drop guards.

pub use super::{in_ns, ip};

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

pub const NAMESPACE_YAML: &str = include_str!("../../../../deploy/namespace.yaml");
pub const CRDS_YAML: &str = include_str!("../../../../deploy/crds.yaml");
pub const RBAC_YAML: &str = include_str!("../../../../deploy/rbac.yaml");
pub const AGENT_YAML: &str = include_str!("../../../../deploy/agent.yaml");
pub const CONTROLLER_YAML: &str = include_str!("../../../../deploy/controller.yaml");

pub const SYSTEM_NS: &str = "portico-system";
pub const API_IP: &str = "10.77.0.1";
pub const CLIENT_IP: &str = "10.77.0.100";
pub const POOL: &str = "10.77.0.200-10.77.0.220";
pub const BACKEND_PORT: u16 = 8080;
pub const LB_CLASS: &str = "portico.dev/lb";

/// One cluster at a time: they share the 10.77.0.0/24 addresses and two CPUs.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `true` when the test can run (root, `ip`, `arping`, `curl`); `false` (after printing why)
/// when it should skip; panics when it cannot run under `PORTICO_CI`.
pub fn can_run() -> bool {
    super::require(
        "network namespaces, veth pairs, raw sockets",
        &["ip", "arping", "curl"],
    )
}

/// The namespaces of one test; deleting them removes their links (the root end of the veth too).
pub struct Net {
    pub prefix: String,
    pub made: Vec<String>,
    pub stop_backends: Arc<AtomicBool>,
}

impl Net {
    pub fn br(&self) -> String {
        format!("{}-br", self.prefix)
    }
    pub fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }
    pub fn client(&self) -> String {
        format!("{}-c", self.prefix)
    }

    pub fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    pub fn create(nodes: usize) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut net = Net {
            prefix: format!("pk{}x{n}", std::process::id() % 100_000),
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
        let mut ends: Vec<(String, String)> = (1..=nodes)
            .map(|i| (net.node(i), format!("10.77.0.{}/24", 10 + i)))
            .collect();
        ends.push((net.client(), format!("{CLIENT_IP}/24")));
        for (k, (ns, addr)) in ends.iter().enumerate() {
            net.attach(ns, &format!("p{k}"), addr);
        }
        net
    }

    /// A new namespace `ns` on the bridge (bridge port `port`), its eth0 holding `addr`.
    pub fn attach(&mut self, ns: &str, port: &str, addr: &str) {
        let br = self.br();
        self.add_ns(ns);
        ip(&[
            "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &br, "link", "set", port, "master", "br0", "up"]);
    }

    /// Controller replica `r`'s pod network namespace (it is not `hostNetwork`).
    pub fn pod(&self, r: usize) -> String {
        format!("{}-k{r}", self.prefix)
    }

    /// An HTTP backend in node `i`'s namespace answering its node name (a "pod" on that node).
    pub fn backend(&self, i: usize) {
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

impl Net {
    /// Watches the client's ARP entry for `vip`, which must name `mac` now: a thread in the
    /// client's namespace polls it every 2 ms (at most 20 s) and sends when it names another
    /// MAC (`None` when it did not within the 20 s).
    pub fn watch_client_arp(
        &self,
        vip: &str,
        mac: &str,
    ) -> std::sync::mpsc::Receiver<Option<(Instant, String)>> {
        let path = format!("/run/netns/{}", self.client());
        let (vip, mac) = (vip.to_string(), mac.to_lowercase());
        let old = mac.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            sys::setns_net(&path).expect("setns into the client");
            let entry = || {
                let text = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
                text.lines().skip(1).find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // complete entries only (ATF_COM)
                    (f.len() >= 4 && f[0] == vip && f[2] == "0x2").then(|| f[3].to_lowercase())
                })
            };
            let _ = ready_tx.send(entry());
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if let Some(m) = entry().filter(|m| *m != old) {
                    let _ = tx.send(Some((Instant::now(), m)));
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = tx.send(None);
        });
        let now = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("ARP watcher started");
        assert_eq!(
            now.as_deref(),
            Some(mac.as_str()),
            "the client's ARP entry for the VIP"
        );
        rx
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
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self, sig: i32) {
        if let Some(c) = self.child.as_mut() {
            let _ = sys::kill(c.id(), sig);
            // bounded: 10 s for the process to go
            for _ in 0..200 {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill(sys::SIGKILL);
    }
}

/// Environment of a container in a manifest: `(name, value or fieldRef path)`.
pub fn manifest_env(yaml: &str) -> Vec<(String, String)> {
    let doc: Value = serde_saphyr_free_parse(yaml);
    doc["spec"]["template"]["spec"]["containers"][0]["env"]
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
/// container: its user (`runAsUser`, container or pod level), only the added capabilities
/// (`drop: [ALL]`), and no privilege escalation.
pub fn manifest_security(yaml: &str) -> Vec<String> {
    let doc: Value = serde_saphyr_free_parse(yaml);
    let pod = &doc["spec"]["template"]["spec"];
    let sc = &pod["containers"][0]["securityContext"];
    let uid = sc["runAsUser"]
        .as_u64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
        .unwrap_or(0)
        .to_string();
    let dropped_all = sc["capabilities"]["drop"]
        .as_array()
        .is_some_and(|d| d.iter().any(|c| c == "ALL"));
    assert!(dropped_all, "the manifest drops ALL capabilities");
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

pub fn manifest_args(yaml: &str) -> Vec<String> {
    let doc: Value = serde_saphyr_free_parse(yaml);
    doc["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the manifest has args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

/// The manifests are plain YAML documents; the test API server's parser reads them.
pub fn serde_saphyr_free_parse(yaml: &str) -> Value {
    let docs = apiserver::yaml_documents(yaml).expect("manifest parses");
    docs.into_iter()
        .find(|d| d.is_object())
        .expect("one document")
}

/// A running cluster: API server, controller, agents, network.
pub struct Cluster {
    // Field order is drop order: processes first, then the network, then the server.
    pub controllers: Vec<Proc>,
    pub agents: Vec<Proc>,
    pub net: Net,
    pub server: ApiServer,
    pub dir: PathBuf,
    pub controller_kubeconfig: PathBuf,
    pub restarts: usize,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.controllers.iter().chain(self.agents.iter()) {
                eprintln!("--- {} (last lines) ---\n{}", p.name, p.log_tail());
            }
            eprintln!(
                "--- refused requests ---\n{}",
                self.server.refusals().join("\n")
            );
        }
        self.controllers.clear();
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Cluster {
    /// Installs portico as docs/kubernetes.md says and starts the controller and `nodes` agents.
    pub async fn start(nodes: usize) -> Self {
        Self::start_with(nodes, false).await
    }

    /// As [`Cluster::start`]; with `forward` the nodes forward IPv4 before the agents start
    /// (as Kubernetes nodes do; the kernel path DNATs to endpoints on other nodes).
    pub async fn start_with(nodes: usize, forward: bool) -> Self {
        let net = Net::create(nodes);
        if forward {
            for i in 1..=nodes {
                let (ok, _) = in_ns(&net.node(i), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
                assert!(ok, "ip_forward on node {i}");
            }
        }
        let server = ApiServer::start(Options {
            bind: format!("{API_IP}:0").parse().expect("address"),
            ..Options::default()
        })
        .await
        .expect("API server starts");
        let dir = std::env::temp_dir().join(format!("portico-k8s-{}", net.prefix));
        std::fs::create_dir_all(&dir).expect("temp dir");

        // Install: the namespace, the gossip Secret with a random key, CRDs and RBAC.
        server.apply_yaml(NAMESPACE_YAML).expect("namespace.yaml");
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(std::process::id() as u8))
            .collect();
        let key_b64 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&key)
        };
        // `kubectl create secret generic portico-gossip --from-literal=key=…`
        server
            .inject(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "portico-gossip", "namespace": SYSTEM_NS},
                "type": "Opaque", "data": {"key": b64(&key_b64)},
            }))
            .expect("gossip Secret");
        server.apply_yaml(CRDS_YAML).expect("crds.yaml");
        server.apply_yaml(RBAC_YAML).expect("rbac.yaml");

        // The cluster's Nodes, as kubelets register them.
        for i in 1..=nodes {
            server
                .inject(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}"), "kubernetes.io/os": "linux"}},
                    "spec": {},
                    "status": {
                        "addresses": [{"type": "InternalIP", "address": format!("10.77.0.{}", 10 + i)}, {"type": "Hostname", "address": format!("node-{i}")}],
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

        let controller_kubeconfig = dir.join("controller.kubeconfig");
        std::fs::write(
            &controller_kubeconfig,
            server.service_account_kubeconfig(SYSTEM_NS, "portico-controller"),
        )
        .expect("kubeconfig");
        let agent_kubeconfig = dir.join("agent.kubeconfig");
        std::fs::write(
            &agent_kubeconfig,
            server.service_account_kubeconfig(SYSTEM_NS, "portico-agent"),
        )
        .expect("kubeconfig");

        let mut c = Cluster {
            controllers: Vec::new(),
            agents: Vec::new(),
            net,
            server,
            dir,
            controller_kubeconfig,
            restarts: 0,
        };
        c.start_controller();
        for i in 1..=nodes {
            c.net.backend(i);
            let p = c.spawn_agent(i, &agent_kubeconfig);
            c.agents.push(p);
        }
        c
    }

    /// `portico <args of the manifest>` with the manifest's env (downward API values filled in
    /// as the kubelet would) and the ServiceAccount's kubeconfig instead of the mounted token.
    pub fn spawn(
        &self,
        name: &str,
        ns: Option<&str>,
        manifest: &str,
        pod: &str,
        (node, host_ip): (&str, &str),
        kubeconfig: &PathBuf,
    ) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let exe = env!("CARGO_BIN_EXE_portico");
        // As the kubelet would run the container: in the node's network namespace (hostNetwork),
        // with the manifest's user and capabilities.
        let mut argv: Vec<String> = match ns {
            Some(ns) => ["ip", "netns", "exec", ns].map(String::from).to_vec(),
            None => Vec::new(),
        };
        argv.extend(manifest_security(manifest));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).arg(exe);
        cmd.args(manifest_args(manifest));
        for (k, v) in manifest_env(manifest) {
            let value = match v.as_str() {
                "spec.nodeName" => node.to_string(),
                "metadata.namespace" => SYSTEM_NS.to_string(),
                "metadata.name" => pod.to_string(),
                // hostNetwork: the pod's address is the node's.
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
            child: Some(cmd.spawn().expect("portico starts")),
            log,
        }
    }

    pub fn spawn_agent(&self, i: usize, kubeconfig: &PathBuf) -> Proc {
        self.spawn(
            &format!("agent-node-{i}"),
            Some(&self.net.node(i)),
            AGENT_YAML,
            &format!("portico-agent-{i}"),
            (&format!("node-{i}"), &format!("10.77.0.{}", 10 + i)),
            kubeconfig,
        )
    }

    /// Starts a controller replica as deploy/controller.yaml says, in its own pod network (it
    /// is not `hostNetwork`: each replica listens on its metrics port on its own address).
    pub fn start_controller(&mut self) {
        let r = self.restarts;
        let pod = format!("portico-controller-{r}");
        self.restarts += 1;
        let netns = self.net.pod(r);
        self.net
            .attach(&netns, &format!("k{r}"), &format!("10.77.0.{}/24", 50 + r));
        let kc = self.controller_kubeconfig.clone();
        let ip = format!("10.77.0.{}", 50 + r);
        let p = self.spawn(&pod, Some(&netns), CONTROLLER_YAML, &pod, ("", &ip), &kc);
        self.controllers.push(p);
    }

    /// Creates a LoadBalancer Service `ns/name` of portico's class on port 80, and its
    /// EndpointSlice with one endpoint per node (`ready` as given).
    pub fn service(&self, ns: &str, name: &str, ready: bool) {
        let all: Vec<(usize, bool)> = (1..=self.agents.len()).map(|i| (i, ready)).collect();
        self.service_with(ns, name, "Cluster", &all);
    }

    /// Like [`Cluster::service`] with an `externalTrafficPolicy` and endpoints only on the
    /// given nodes `(node, ready)`.
    pub fn service_with(&self, ns: &str, name: &str, etp: &str, on: &[(usize, bool)]) {
        self.service_families(ns, name, etp, on, false);
    }

    /// Like [`Cluster::service_with`]; `dual`: `ipFamilyPolicy: RequireDualStack` with
    /// `ipFamilies: [IPv4, IPv6]` (the endpoints stay IPv4: the balancer proxies).
    pub fn service_families(
        &self,
        ns: &str,
        name: &str,
        etp: &str,
        on: &[(usize, bool)],
        dual: bool,
    ) {
        self.service_annotated(ns, name, etp, on, dual, json!({}));
    }

    /// As [`Cluster::service_families`], with `annotations` on the Service.
    pub fn service_annotated(
        &self,
        ns: &str,
        name: &str,
        etp: &str,
        on: &[(usize, bool)],
        dual: bool,
        annotations: Value,
    ) {
        if self.server.get("v1", "Namespace", None, ns).is_none() {
            self.server
                .inject(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("namespace");
        }
        let mut svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": LB_CLASS, "selector": {"app": name}, "externalTrafficPolicy": etp,
                     "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}]},
        });
        if dual {
            svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
            svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        }
        self.server.inject(svc).expect("Service");
        let endpoints: Vec<Value> = on
            .iter()
            .map(|&(i, ready)| {
                json!({
                    "addresses": [format!("10.77.0.{}", 10 + i)],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
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

    /// The Service's ingress addresses, once the controller wrote them (bounded wait).
    pub async fn wait_address(&self, ns: &str, name: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let svc = self
                .server
                .get("v1", "Service", Some(ns), name)
                .expect("Service exists");
            if let Some(ip) = svc["status"]["loadBalancer"]["ingress"][0]["ip"].as_str() {
                return ip.to_string();
            }
            assert!(
                Instant::now() < until,
                "{ns}/{name} got no address within {within:?}: {svc}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The MAC addresses answering ARP for `vip` from the client namespace.
    pub fn arp_answers(&self, vip: &str) -> Vec<String> {
        let (_, out) = in_ns(
            &self.net.client(),
            &[
                "arping", "-c", "3", "-W", "0.3", "-w", "2", "-i", "eth0", vip,
            ],
        );
        let mut macs: Vec<String> = out
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .collect();
        macs.sort();
        macs.dedup();
        macs
    }

    /// Polls until exactly one MAC answers ARP for `vip` (bounded), returning it.
    pub async fn wait_one_arp_owner(&self, vip: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let macs = self.arp_answers(vip);
            if macs.len() == 1 {
                return macs[0].clone();
            }
            assert!(
                Instant::now() < until,
                "want exactly one node answering ARP for {vip} within {within:?}, got {macs:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `curl http://vip/` from the client: the answering backend's node name.
    pub fn curl(&self, vip: &str) -> Option<String> {
        let (ok, out) = in_ns(
            &self.net.client(),
            &["curl", "-s", "-m", "2", &format!("http://{vip}/")],
        );
        ok.then(|| out.trim().to_string())
    }

    /// Node `i`'s eth0 MAC.
    pub fn node_mac(&self, i: usize) -> String {
        let (_, out) = in_ns(&self.net.node(i), &["cat", "/sys/class/net/eth0/address"]);
        out.trim().to_string()
    }

    /// The node (1-based) whose eth0 has `mac`.
    pub fn node_of_mac(&self, mac: &str) -> usize {
        (1..=self.agents.len())
            .find(|i| self.node_mac(*i).eq_ignore_ascii_case(mac))
            .unwrap_or_else(|| panic!("{mac} is no node's MAC"))
    }

    /// deploy/rbac.yaml allowed everything the binaries did: no request was refused as
    /// unauthenticated or forbidden.
    pub fn assert_rbac_was_enough(&self) {
        let refused: Vec<String> = self
            .server
            .refusals()
            .into_iter()
            .filter(|r| r.starts_with("401") || r.starts_with("403"))
            .collect();
        assert!(refused.is_empty(), "refused by RBAC: {refused:#?}");
    }

    /// The `ServiceAnnouncement` of `ns/name`, if it exists.
    pub fn announcement(&self, ns: &str, name: &str) -> Option<Value> {
        self.server.get(
            "portico.dev/v1alpha1",
            "ServiceAnnouncement",
            Some(ns),
            name,
        )
    }

    /// What the `ServiceAnnouncement` of `ns/name` says about `vip`: the nodes whose entry
    /// lists it under `owns`, and every `(node, reason)` written for it.
    pub fn vip_report(&self, ns: &str, name: &str, vip: &str) -> VipReport {
        let sva = self.announcement(ns, name).unwrap_or_default();
        let mut r = VipReport {
            raw: sva["status"].clone(),
            ..VipReport::default()
        };
        for e in sva["status"]["nodes"].as_array().into_iter().flatten() {
            let node = e["node"].as_str().unwrap_or_default().to_string();
            if e["owns"]
                .as_array()
                .is_some_and(|o| o.iter().any(|a| a == vip))
            {
                r.owners.push(node.clone());
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                if a["address"] == vip {
                    let reason = a["reason"].as_str().unwrap_or_default().to_string();
                    r.reasons.push((node.clone(), reason));
                }
            }
        }
        r
    }

    /// Polls the `ServiceAnnouncement` of `ns/name` until `done` holds for what it says about
    /// `vip` (bounded), returning that.
    pub async fn wait_report(
        &self,
        ns: &str,
        name: &str,
        vip: &str,
        within: Duration,
        want: &str,
        done: impl Fn(&VipReport) -> bool,
    ) -> VipReport {
        let until = Instant::now() + within;
        loop {
            let r = self.vip_report(ns, name, vip);
            if done(&r) {
                return r;
            }
            assert!(
                Instant::now() < until,
                "{ns}/{name} {vip}: want {want} within {within:?}; status: {}",
                r.raw
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until exactly one node reports owning `vip` (it lists it under `owns`, reason
    /// `owner`) and no other node writes anything about it; returns that node's name.
    pub async fn wait_owner(&self, ns: &str, name: &str, vip: &str, within: Duration) -> String {
        let r = self
            .wait_report(ns, name, vip, within, "one owner and nothing else", |r| {
                r.owners.len() == 1 && r.reasons.len() == 1 && r.reasons[0].1 == "owner"
            })
            .await;
        assert_eq!(r.reasons[0].0, r.owners[0], "{}", r.raw);
        r.owners[0].clone()
    }
}

/// What a `ServiceAnnouncement` says about one address.
#[derive(Default, Debug)]
pub struct VipReport {
    /// Nodes whose entry lists the address under `owns`.
    pub owners: Vec<String>,
    /// `(node, reason)` for every entry that gives the address a reason.
    pub reasons: Vec<(String, String)>,
    /// The whole status, for messages.
    pub raw: Value,
}

pub fn ip_in_pool(ip: &str) -> bool {
    let last: u8 = ip
        .strip_prefix("10.77.0.")
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    (200..=220).contains(&last)
}
