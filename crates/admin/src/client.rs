//! A minimal HTTP/1.1 client for the admin API (`portico status`), loopback and LAN only.

use std::net::SocketAddr;
use std::time::Duration;

use model::StatusReport;
use model::events::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Errors talking to a running portico.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect or the connection broke.
    #[error(
        "cannot reach the admin API at {addr} (is portico running, and is admin.listen {addr}?)"
    )]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("the admin API at {0} did not answer within 5s")]
    Timeout(SocketAddr),
    /// The answer was not HTTP.
    #[error("malformed HTTP response from {0}")]
    Malformed(SocketAddr),
    /// Non-200 answer.
    #[error("the admin API answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Body text.
        body: String,
    },
    /// `/status` was not a status report.
    #[error("the admin API sent a status report this portico cannot read")]
    Json(#[source] serde_json::Error),
    /// A line of `/events` was not an event.
    #[error("the admin API sent an event this portico cannot read: {line}")]
    EventJson {
        /// The line.
        line: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

/// GETs `path` from the admin server at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response, ClientError> {
    tokio::time::timeout(Duration::from_secs(5), get_inner(addr, path))
        .await
        .map_err(|_| ClientError::Timeout(addr))?
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<Response, ClientError> {
    let io = |source| ClientError::Connect { addr, source };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(io)?;
    parse_response(&raw).ok_or(ClientError::Malformed(addr))
}

/// Splits a raw HTTP/1.1 response into status and body (content-length, chunked or close).
fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut chunked = false;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
        if k.eq_ignore_ascii_case("content-length") {
            let n: usize = v.trim().parse().ok()?;
            body = body.get(..n)?;
        }
    }
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&body[..eol]).ok()?.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(eol + 2..eol + 2 + size)?);
            body = body.get(eol + 4 + size..)?;
        }
        out
    } else {
        body.to_vec()
    };
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Fetches `/status`.
pub async fn status(addr: SocketAddr) -> Result<StatusReport, ClientError> {
    let r = get(addr, "/status").await?;
    if r.status != 200 {
        return Err(ClientError::Status {
            status: r.status,
            body: r.body,
        });
    }
    serde_json::from_str(&r.body).map_err(ClientError::Json)
}

/// Fetches the kept events after sequence number `since` (`/events?since=N`), oldest first.
pub async fn events(addr: SocketAddr, since: u64) -> Result<Vec<Event>, ClientError> {
    let r = get(addr, &format!("/events?since={since}")).await?;
    if r.status != 200 {
        return Err(ClientError::Status {
            status: r.status,
            body: r.body,
        });
    }
    r.body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|source| ClientError::EventJson {
                line: l.to_string(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse_response(
            b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
        assert!(parse_response(b"garbage").is_none());
    }
}
