//! The systems under test: portico nodes (default or fast profile, default or tuned checks) and
//! keepalived (advert_int 1 or 0.01), their configs, starting and stopping them.

use super::*;

pub(super) struct Running {
    pub(super) system: System,
    pub(super) pids: BTreeMap<usize, u32>,
    pub(super) backend_pids: BTreeMap<usize, u32>,
    /// portico: the nodes run with the default health check (else the tuned one).
    pub(super) default_checks: bool,
    /// Per node: `arp_ignore`/`arp_announce` of eth0 before any node ran (boot values).
    pub(super) sysctls_before: BTreeMap<usize, (String, String)>,
}

impl Running {
    /// The health-check settings, as the results state them.
    pub(super) fn checks(&self) -> &'static str {
        match self.system {
            System::Keepalived { .. } => KEEPALIVED_CHECKS,
            System::Portico { .. } if self.default_checks => DEFAULT_CHECKS,
            System::Portico { .. } => TUNED_CHECKS,
        }
    }
}

pub(super) fn portico_config(
    lab: &Lab,
    i: usize,
    fast: bool,
    default_checks: bool,
    args: &LabArgs,
) -> String {
    // the default check: no settings but the type
    let check = if default_checks {
        "{type: tcp}"
    } else {
        TUNED_CHECK
    };
    let peers: Vec<String> = (1..=lab.nodes)
        .filter(|j| *j != i)
        .map(|j| format!("    - {{name: node-{j}, address: 10.99.0.{}:7946}}", 10 + j))
        .collect();
    // Each node lists only its own backend: the owner function reads placement from the
    // shared part of the config, and other nodes' local health from their heartbeats.
    let backends: Vec<String> = (i..=i)
        .map(|j| format!("      - {{name: node-{j}, address: 127.0.0.1, node: node-{j}}}"))
        .collect();
    format!(
        "node:\n  name: node-{i}\n  interfaces: [{{name: eth0, addresses: [10.99.0.{ip}/24, \"fd00:99::{ip}/64\"]}}]\n\
         cluster:\n  bind: 10.99.0.{ip}:7946\n  peers:\n{peers}\n  keys: [{{id: 1, secret: \"{key}\"}}]\n  \
         profile: {profile}\n  preemptive: {pre}\n  hold_down: {hold}\n  announce: {{count: 3, interval: 50ms, refresh: 10s}}\n\
         admin:\n  listen: 127.0.0.1:9440\n\
         services:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{name: http, port: 80, target_port: 8080}}, {{name: echo, port: 81, target_port: 9090}}]\n    backends:\n{backends}\n    \
         health_check: {check}\n    \
         connection: {{connect_timeout: 50ms, retries: 0}}\n    outlier: {{consecutive_failures: 0}}\n    \
         placement: {{local_only: true, preferred: [node-1]}}\n  \
         - name: web6\n    vips: [\"{VIP6}\"]\n    ports: [{{name: http, port: 80, target_port: 8080}}]\n    backends:\n{backends}\n    \
         health_check: {check}\n    \
         connection: {{connect_timeout: 50ms, retries: 0}}\n    outlier: {{consecutive_failures: 0}}\n    \
         placement: {{local_only: true, preferred: [node-1]}}\n",
        ip = 10 + i,
        peers = peers.join("\n"),
        backends = backends.join("\n"),
        key = "5f".repeat(32),
        profile = if fast { "fast" } else { "default" },
        pre = !args.non_preemptive,
        hold = args.hold_down,
    )
}

fn keepalived_config(i: usize, fastest: bool) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    Ok(format!(
        "global_defs {{\n  router_id node-{i}\n  vrrp_version 3\n  script_user root\n  enable_script_security\n}}\n\
         vrrp_script chk {{\n  script \"{exe} lab check 127.0.0.1:80\"\n  interval 1\n  fall 1\n  rise 1\n}}\n\
         vrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int {adv}\n  \
         virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n  track_script {{\n    chk\n  }}\n}}\n",
        exe = exe.display(),
        prio = 200 - i,
        adv = if fastest { "0.01" } else { "1" },
    ))
}

impl Running {
    pub(super) fn start_node(&mut self, lab: &Lab, i: usize, args: &LabArgs) -> anyhow::Result<()> {
        let ns = lab.ns_node(i);
        match self.system {
            System::Portico { fast } => {
                let path = lab.dir.join(format!("node-{i}.yaml"));
                std::fs::write(
                    &path,
                    portico_config(lab, i, fast, self.default_checks, args),
                )?;
                let pid = lab.spawn(
                    &ns,
                    &format!("node-{i}.log"),
                    &["run", "--config", path.to_str().unwrap_or_default()],
                )?;
                self.pids.insert(i, pid);
            }
            System::Keepalived { fastest } => {
                let path = lab.dir.join(format!("keepalived-{i}.conf"));
                std::fs::write(&path, keepalived_config(i, fastest)?)?;
                // a killed keepalived stays a zombie until reaped: its pid files would make
                // the new one refuse to start ("daemon is already running")
                let _ = std::fs::remove_file(lab.dir.join(format!("vrrp-{i}.pid")));
                let _ = std::fs::remove_file(lab.dir.join(format!("keepalived-{i}.pid")));
                let pid = lab.spawn_exe(
                    &ns,
                    &format!("keepalived-{i}.log"),
                    "keepalived",
                    &[
                        "-n",
                        "-l",
                        "-D",
                        "-P",
                        "-f",
                        path.to_str().unwrap_or_default(),
                        "-p",
                        lab.dir
                            .join(format!("keepalived-{i}.pid"))
                            .to_str()
                            .unwrap_or_default(),
                        "-r",
                        lab.dir
                            .join(format!("vrrp-{i}.pid"))
                            .to_str()
                            .unwrap_or_default(),
                    ],
                )?;
                self.pids.insert(i, pid);
            }
        }
        Ok(())
    }

    pub(super) fn start_backend(&mut self, lab: &Lab, i: usize) -> anyhow::Result<()> {
        let (listen, echo) = match self.system {
            System::Portico { .. } => ("127.0.0.1:8080", "127.0.0.1:9090"),
            System::Keepalived { .. } => ("0.0.0.0:80", "0.0.0.0:81"),
        };
        let pid = lab.spawn_backend(i, listen, echo, false)?;
        self.backend_pids.insert(i, pid);
        Ok(())
    }

    pub(super) fn kill_node(&mut self, lab: &Lab, i: usize, sig: i32) -> Option<u32> {
        let pid = self.pids.remove(&i);
        if let Some(pid) = pid {
            let _ = sys::kill(pid, sig);
        }
        if let System::Keepalived { .. } = self.system
            && sig == sys::SIGKILL
            && let Ok(p) = std::fs::read_to_string(lab.dir.join(format!("vrrp-{i}.pid")))
            && let Ok(pid) = p.trim().parse::<u32>()
        {
            let _ = sys::kill(pid, sys::SIGKILL);
        }
        pid
    }
}
