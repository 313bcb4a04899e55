//! A VIP listener whose port is taken (`Address already in use`, e.g. MySQL on the same host
//! bound to the wildcard) is published as closed and retried with back-off until it opens.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lb::LoadBalancer;
use model::{Desired, HealthView};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

async fn wait_for(
    rx: &mut watch::Receiver<Arc<BTreeSet<IpAddr>>>,
    want: &BTreeSet<IpAddr>,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    loop {
        if **rx.borrow_and_update() == *want {
            return t.elapsed();
        }
        assert!(
            tokio::time::timeout_at(t + within, rx.changed())
                .await
                .is_ok(),
            "closed listeners still {:?}, want {want:?}",
            rx.borrow()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_a_taken_port_is_published_closed_and_retried_until_it_opens() {
    let vip: IpAddr = "127.0.0.77".parse().unwrap();
    // another program holds the port (no SO_REUSEPORT: the balancer's bind fails)
    let taken = std::net::TcpListener::bind(SocketAddr::new(vip, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "node: {{name: n1}}\nservices:\n  - name: db\n    vips: [{vip}]\n    ports: [{{port: {port}}}]\n    \
         backends: [{{address: 127.0.0.1, port: 9}}]\n    health_check: {{type: none}}\n"
    );
    let cfg = model::config::parse(&yaml, &Default::default()).expect("valid");
    let lb = LoadBalancer::new(&mut Registry::default());
    let mut closed = lb.closed_listeners();
    let (_dtx, drx) = watch::channel(Arc::new(Desired {
        generation: 1,
        config: Arc::new(cfg),
    }));
    let (htx, _hrx) = watch::channel(Arc::new(HealthView::new()));
    let stop = CancellationToken::new();
    let task = {
        let (lb, stop) = (lb.clone(), stop.clone());
        tokio::spawn(async move { lb.run(drx, htx, stop).await })
    };
    wait_for(&mut closed, &[vip].into(), Duration::from_secs(5)).await;
    // still taken for a while: it stays closed (and the balancer keeps retrying)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(**closed.borrow(), BTreeSet::from([vip]));
    // the other program goes away: the listener opens without a reload
    drop(taken);
    let took = wait_for(&mut closed, &BTreeSet::new(), Duration::from_secs(10)).await;
    println!("opened {took:?} after the port was freed");
    let c = tokio::net::TcpStream::connect(SocketAddr::new(vip, port)).await;
    assert!(c.is_ok(), "the balancer listens now: {c:?}");
    stop.cancel();
    let _ = task.await;
}
