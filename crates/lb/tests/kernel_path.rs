//! A service the kernel path forwards opens no proxy listener (its health checks still run),
//! and `/status` names each service's path and reason.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use lb::listen::Binder;
use lb::{LoadBalancer, Options};
use model::config::{Environment, parse};
use model::{Desired, Path};
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;

/// Records every address it is asked to bind; binds an ephemeral loopback port instead.
#[derive(Default)]
struct Recording(Mutex<Vec<SocketAddr>>);

impl Binder for Recording {
    fn tcp(&self, addr: SocketAddr, _count: usize) -> io::Result<Vec<std::net::TcpListener>> {
        self.0.lock().unwrap().push(addr);
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        Ok(vec![l])
    }
    fn udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.0.lock().unwrap().push(addr);
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    }
}

const SERVICES: &str = "services:
  - name: fast
    vips: [10.255.0.1]
    ports: [{port: 80}]
    health_check: {type: none}
    backends: [{address: 10.255.1.1}]
  - name: legacy
    vips: [10.255.0.2]
    ports: [{port: 80}]
    proxy_protocol: v2
    health_check: {type: none}
    backends: [{address: 10.255.1.1}]
";

async fn run(kernel_path: bool) -> (Vec<SocketAddr>, Vec<(Path, String)>) {
    let binder = Arc::new(Recording::default());
    let lb = LoadBalancer::with_options(
        &mut Registry::default(),
        Options {
            binder: binder.clone(),
            kernel_path: kernel_path.into(),
            ..Options::default()
        },
    );
    let config = Arc::new(parse(SERVICES, &Environment::default()).unwrap());
    lb.apply(&Desired {
        generation: 1,
        config,
    });
    let paths = ["fast", "legacy"]
        .iter()
        .map(|s| {
            let st = lb.service_status(s).unwrap();
            (st.path, st.path_reason)
        })
        .collect();
    let bound = binder.0.lock().unwrap().clone();
    (bound, paths)
}

#[tokio::test]
async fn kernel_services_open_no_listener_and_say_why() {
    let (bound, paths) = run(true).await;
    assert_eq!(
        bound,
        vec!["10.255.0.2:80".parse().unwrap()],
        "only the proxied service listens"
    );
    assert_eq!(paths[0], (Path::Kernel, "auto".to_string()));
    assert_eq!(paths[1], (Path::Proxy, "proxyProtocol".to_string()));

    // without a kernel path on the node, both are proxied
    let (bound, paths) = run(false).await;
    assert_eq!(bound.len(), 2);
    assert_eq!(paths[0], (Path::Proxy, "kernelUnavailable".to_string()));
}
