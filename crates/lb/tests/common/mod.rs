//! Shared harness for the loopback integration tests: a balancer with an injected loopback
//! binder, and small backend servers. Every address is on 127.0.0.0/8 or ::1; every loop is
//! bounded in count and time.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lb::listen::LoopbackBinder;
use lb::{LoadBalancer, Options};
use model::{Desired, HealthView, Protocol};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// Every harness relays as `proxy.io`'s default does (long-lived connections move onto the
/// workers' io_uring); `PORTICO_TEST_PROXY_IO=epoll` keeps every relay on tokio
/// (`scripts/test-all` runs the `lb` suite once each way).
pub fn uring() -> bool {
    std::env::var("PORTICO_TEST_PROXY_IO").as_deref() != Ok("epoll")
}

pub fn config(services_yaml: &str) -> Arc<model::Config> {
    let src =
        format!("node:\n  name: test\nadmin:\n  listen: 127.0.0.1:1\nservices:\n{services_yaml}");
    match model::config::parse(&src, &model::config::Environment::default()) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid: {e:?}\n{src}"),
    }
}

pub struct Harness {
    pub lb: LoadBalancer,
    pub binder: Arc<LoopbackBinder>,
    pub desired: watch::Sender<Arc<Desired>>,
    pub health: watch::Receiver<Arc<HealthView>>,
    pub shutdown: CancellationToken,
    pub registry: Arc<std::sync::Mutex<Registry>>,
    generation: u64,
    task: JoinHandle<Result<(), lb::Error>>,
}

impl Harness {
    pub async fn start(services_yaml: &str) -> Self {
        Self::start_with(services_yaml, true).await
    }

    pub async fn start_with(services_yaml: &str, splice: bool) -> Self {
        Self::start_opts(
            services_yaml,
            splice,
            lb::budget::Budget::from_nofile(1 << 16),
        )
        .await
    }

    /// With an explicit connection budget.
    pub async fn start_budget(services_yaml: &str, budget: lb::budget::Budget) -> Self {
        Self::start_opts(services_yaml, true, budget).await
    }

    async fn start_opts(services_yaml: &str, splice: bool, budget: lb::budget::Budget) -> Self {
        Self::start_tuned(services_yaml, |o| {
            o.splice = splice;
            o.budget = budget;
        })
        .await
    }

    /// With the harness's options changed by `tune` (the binder stays the loopback one).
    pub async fn start_tuned(services_yaml: &str, tune: impl FnOnce(&mut Options)) -> Self {
        let binder = Arc::new(LoopbackBinder::default());
        let mut registry = Registry::default();
        let mut opts = Options {
            binder: binder.clone(),
            splice: true,
            budget: lb::budget::Budget::from_nofile(1 << 16),
            kernel_path: false.into(),
            // every loopback test runs through two proxy workers (SO_REUSEPORT listeners)
            workers: 2,
            uring: uring(),
            uring_buffers: lb::uring::BUFFERS,
        };
        tune(&mut opts);
        opts.binder = binder.clone();
        let lb = LoadBalancer::with_options(&mut registry, opts);
        let (dtx, drx) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: config(services_yaml),
        }));
        let (htx, hrx) = watch::channel(Arc::new(HealthView::new()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let lb = lb.clone();
            let shutdown = shutdown.clone();
            async move { lb.run(drx, htx, shutdown).await }
        });
        let h = Self {
            lb,
            binder,
            desired: dtx,
            health: hrx,
            shutdown,
            registry: Arc::new(std::sync::Mutex::new(registry)),
            generation: 1,
            task,
        };
        // Wait for the first generation's listeners.
        for _ in 0..200 {
            if h.binder.binds() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h
    }

    pub fn reload(&mut self, services_yaml: &str) {
        self.generation += 1;
        self.desired.send_replace(Arc::new(Desired {
            generation: self.generation,
            config: config(services_yaml),
        }));
    }

    /// The loopback address standing for `vip`.
    pub fn addr(&self, vip: &str) -> SocketAddr {
        self.addr_proto(vip, Protocol::Tcp)
    }

    pub fn addr_proto(&self, vip: &str, p: Protocol) -> SocketAddr {
        let vip: SocketAddr = vip.parse().unwrap();
        self.binder
            .local(vip, p)
            .unwrap_or_else(|| panic!("no listener for {vip}"))
    }

    pub async fn wait_health(&self, service: &str, backend: &str, want: model::Health) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.lb.backend_health(service, backend) != Some(want) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend} never became {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The number of active checks run against `backend` (passed or failed), from the check
    /// latency histogram.
    pub fn checks_run(&self, service: &str, backend: &str) -> u64 {
        self.metric(&format!(
            "portico_lb_check_duration_seconds_count{{service=\"{service}\",backend=\"{backend}\"}}"
        ))
    }

    /// The value of one series in the metrics text (0 when absent).
    pub fn metric(&self, series: &str) -> u64 {
        self.metrics_text()
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        s
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// Polls `cond` every 5 ms until it holds. Panics naming the state `what` that never came
/// after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never within {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A TCP backend: on each connection it writes `<name>\n`, then echoes until EOF, then closes.
/// Counts connections that sent at least one byte (client traffic, not health checks).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub served: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    pub max_open: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
    hold: Arc<tokio::sync::Notify>,
    pub hold_mode: bool,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap(), false).await
    }

    /// A backend that keeps each connection open (after the greeting) until `release_all`.
    pub async fn start_holding(name: &str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap(), true).await
    }

    pub async fn start_at(name: &str, addr: SocketAddr, hold_mode: bool) -> Self {
        let mut b = Self {
            name: name.into(),
            addr,
            served: Arc::default(),
            open: Arc::default(),
            max_open: Arc::default(),
            bytes: Arc::default(),
            accept: None,
            hold: Arc::new(tokio::sync::Notify::new()),
            hold_mode,
        };
        b.listen().await.unwrap();
        b
    }

    async fn listen(&mut self) -> std::io::Result<()> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(self.addr),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_reuse_address(true)?;
        sock.bind(&self.addr.into())?;
        sock.listen(1024)?;
        sock.set_nonblocking(true)?;
        let l = TcpListener::from_std(sock.into())?;
        self.addr = l.local_addr()?;
        let (name, served, open, max_open, bytes, hold, hold_mode) = (
            self.name.clone(),
            self.served.clone(),
            self.open.clone(),
            self.max_open.clone(),
            self.bytes.clone(),
            self.hold.clone(),
            self.hold_mode,
        );
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (name, served, open, max_open, bytes, hold) = (
                    name.clone(),
                    served.clone(),
                    open.clone(),
                    max_open.clone(),
                    bytes.clone(),
                    hold.clone(),
                );
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut counted = false;
                    if hold_mode {
                        let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                        max_open.fetch_max(now, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                        let notified = hold.notified();
                        tokio::select! {
                            () = notified => {}
                            _ = s.read(&mut buf) => {}
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if !counted {
                                    counted = true;
                                    served.fetch_add(1, Ordering::SeqCst);
                                }
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        }));
        Ok(())
    }

    /// Stops accepting (new connects are refused); open connections finish.
    pub fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn revive(&mut self) {
        // The aborted task drops its listener asynchronously; retry the bind briefly.
        for _ in 0..100 {
            if self.listen().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("could not rebind {}", self.addr);
    }

    pub fn release_all(&self) {
        self.hold.notify_waiters();
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request through the balancer: connect, read the greeting line, send `msg`, read the echo.
/// Returns the backend name.
pub async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let name = read_line(&mut s).await?;
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    if back != msg {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(name)
}

pub async fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
}

/// A backend entry for the test YAML.
pub fn be(name: &str, addr: SocketAddr) -> String {
    format!(
        "      - {{name: {name}, address: {}, port: {}}}\n",
        addr.ip(),
        addr.port()
    )
}

/// A blocking backend on its own thread: greets each of `n` connections with `b\n` and closes.
pub fn blocking_backend(n: usize) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(n).flatten() {
            let _ = std::io::Write::write_all(&mut s, b"b\n");
        }
    });
    addr
}

/// Connects with blocking sockets and reads the greeting, bounded by timeouts.
pub fn blocking_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)?;
    Ok(line.trim_end().to_string())
}
