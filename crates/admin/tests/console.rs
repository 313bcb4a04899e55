//! The console's streams over real sockets (127.0.0.1): a change reaches an open stream without
//! a new request, at most `MAX_STREAMS` are open at once (the next is answered 503 and counted),
//! a closed one frees its place, and shutdown ends them (the server does not wait for clients).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use admin::console::MAX_STREAMS;
use admin::{AdminLimits, AdminMetrics, AdminState};
use model::StatusReport;
use model::events::{Change, EventLog};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Duration, timeout};
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    registry: Registry,
    node: Arc<Mutex<String>>,
    events: EventLog,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _ready: watch::Sender<bool>,
}

async fn start() -> Server {
    let mut registry = Registry::default();
    let metrics = AdminMetrics::register(&mut registry);
    let (tx, rx) = watch::channel(true);
    let node = Arc::new(Mutex::new("n1".to_string()));
    let events = EventLog::new(16);
    let n = node.clone();
    let state = AdminState {
        registry: Arc::new(Registry::default()),
        status: Arc::new(move || StatusReport {
            node: n.lock().unwrap().clone(),
            ..Default::default()
        }),
        ready: rx,
        events: events.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(admin::serve_with(
        listener,
        state,
        AdminLimits::default(),
        metrics,
        stop.clone(),
    ));
    Server {
        addr,
        registry,
        node,
        events,
        stop,
        task,
        _ready: tx,
    }
}

/// An open stream and what has arrived on it that no `until` consumed yet.
struct Conn {
    s: TcpStream,
    text: String,
}

impl Conn {
    /// Reads until `want` has arrived (within 5 s); consumes the text up to its end.
    async fn until(&mut self, want: &str) -> String {
        let mut buf = [0u8; 4096];
        let (s, text) = (&mut self.s, &mut self.text);
        timeout(Duration::from_secs(5), async {
            while !text.contains(want) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before {want:?}: {text}");
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} within 5 s: {text}"));
        let end = text.find(want).unwrap() + want.len();
        let seen = text[..end].to_string();
        text.drain(..end);
        seen
    }
}

/// Opens a stream; the connection and its response head.
async fn open(addr: SocketAddr) -> (Conn, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /console/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut c = Conn {
        s,
        text: String::new(),
    };
    let head = c.until("\r\n\r\n").await;
    (c, head)
}

fn stream_refusals(registry: &Registry) -> u64 {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix("portico_admin_connections_closed_total{reason=\"streamLimit\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_change_reaches_an_open_stream_and_an_event_too() {
    let server = start().await;
    let (mut s, head) = open(server.addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    s.until("Node <span class=\"name\">n1</span>").await;
    *server.node.lock().unwrap() = "renamed".into();
    s.until("Node <span class=\"name\">renamed</span>").await;
    server.events.with(|r| {
        r.push(
            0,
            Change {
                kind: "health",
                subject: "web/b1".into(),
                message: "up → down".into(),
                duration: None,
            },
        )
    });
    s.until("web/b1: up → down").await;
    // and /events serves it as a JSON line
    let r = admin::client::get(server.addr, "/events?since=0")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let e: model::events::Event = serde_json::from_str(r.body.trim()).unwrap();
    assert_eq!((e.seq, e.kind.as_str()), (1, "health"));
    assert!(
        admin::client::get(server.addr, "/events?since=1")
            .await
            .unwrap()
            .body
            .is_empty()
    );
    server.stop.cancel();
}

#[tokio::test]
async fn streams_are_bounded_and_a_closed_one_frees_its_place() {
    let server = start().await;
    let mut open_streams = Vec::new();
    for _ in 0..MAX_STREAMS {
        let (s, head) = open(server.addr).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        open_streams.push(s);
    }
    let (_refused, head) = open(server.addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(stream_refusals(&server.registry), 1);
    // the page and the API still answer
    let page = admin::client::get(server.addr, "/").await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<main id=\"live\">"));
    // a stream that goes away frees its place
    drop(open_streams.pop());
    let mut freed = false;
    for _ in 0..50 {
        let (_s, head) = open(server.addr).await;
        if head.starts_with("HTTP/1.1 200") {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "a closed stream did not free its place");
    server.stop.cancel();
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let server = start().await;
    let (mut s, _) = open(server.addr).await;
    s.until("snapshot").await;
    server.stop.cancel();
    // the server returns although the client never leaves
    timeout(Duration::from_secs(3), server.task)
        .await
        .expect("the server stops within 3 s with a stream open")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let n = timeout(Duration::from_secs(3), s.s.read_to_end(&mut rest)).await;
    assert!(n.is_ok(), "the stream was ended");
}
