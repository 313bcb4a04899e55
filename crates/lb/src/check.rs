//! Active health probes and their scheduler.
//!
//! Probes: TCP connect; HTTP/1.1 `GET` with path, `Host` and an expected status; MySQL/MariaDB,
//! which reads the server greeting (Initial Handshake packet), requires protocol version 10 and a
//! well-formed greeting, then logs in as user `portico` without password (a
//! `HandshakeResponse41`), reads the server's answer — OK, or an error such as 1045 *access
//! denied*, both prove the server is serving — and sends `COM_QUIT` before closing. This is
//! HAProxy's `mysql-check user` flow: finishing the handshake keeps the server from counting the
//! check as an aborted connection (which, repeated `max_connect_errors` times, blocks the host).
//! An error packet (`0xff`) in place of the greeting, or 1040 *Too many connections* (1203, 1129)
//! in answer to the login, means down. Reference: MariaDB "Connection" protocol docs, section "Initial handshake packet".
//!
//! The scheduler runs one task per backend: the first check after a random delay within one
//! interval, then every `interval` ± 10 % (jitter so checks of many backends never align), each
//! bounded by `timeout`, results fed to the pure [`crate::health::RiseFall`].

use rand::RngExt as _;
use std::net::SocketAddr;

use model::CheckKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Duration;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The probe did not finish within the check timeout.
    #[error("timed out")]
    Timeout,
    /// Connect or I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The HTTP answer had another status.
    #[error("HTTP status {got}, expected {want}")]
    HttpStatus {
        /// Received.
        got: u16,
        /// Expected.
        want: u16,
    },
    /// The HTTP answer was not HTTP.
    #[error("malformed HTTP response")]
    HttpMalformed,
    /// The server sent a MySQL error packet instead of a greeting.
    #[error("MySQL error {code}: {message}")]
    MysqlError {
        /// Error code (1040 = too many connections).
        code: u16,
        /// Server message.
        message: String,
    },
    /// The greeting had an unsupported protocol version.
    #[error("MySQL protocol version {0}, expected 10")]
    MysqlProtocol(u8),
    /// The greeting was malformed.
    #[error("malformed MySQL greeting")]
    MysqlMalformed,
}

impl ProbeError {
    /// The reason word for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::Timeout => "timeout",
            ProbeError::Io(_) => "connectFailed",
            ProbeError::HttpStatus { .. } => "unexpectedStatus",
            ProbeError::HttpMalformed => "malformedResponse",
            ProbeError::MysqlError { .. } => "mysqlError",
            ProbeError::MysqlProtocol(_) => "mysqlProtocol",
            ProbeError::MysqlMalformed => "malformedGreeting",
        }
    }
}

/// Runs one probe of `kind` against `addr`, bounded by `timeout`.
pub async fn probe(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, probe_inner(kind, addr)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

async fn probe_inner(kind: &CheckKind, addr: SocketAddr) -> Result<(), ProbeError> {
    let mut s = TcpStream::connect(addr).await?;
    match kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http {
            path,
            expect_status,
            host,
        } => {
            let host = host.clone().unwrap_or_else(|| match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portico-check\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::with_capacity(512);
            let status = loop {
                if let Some(st) = parse_status_line(&buf)? {
                    break st;
                }
                if buf.len() > 4096 {
                    return Err(ProbeError::HttpMalformed);
                }
                let mut chunk = [0u8; 512];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ProbeError::HttpMalformed);
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            if status == *expect_status {
                Ok(())
            } else {
                Err(ProbeError::HttpStatus {
                    got: status,
                    want: *expect_status,
                })
            }
        }
        CheckKind::Mysql => mysql(&mut s).await,
    }
}

/// The status code once the first line is complete.
fn parse_status_line(buf: &[u8]) -> Result<Option<u16>, ProbeError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProbeError::HttpMalformed)?;
    let mut parts = line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(ProbeError::HttpMalformed);
    }
    let code = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or(ProbeError::HttpMalformed)?;
    Ok(Some(code))
}

async fn read_packet(s: &mut TcpStream) -> Result<(u8, Vec<u8>), ProbeError> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len == 0 || len > 1 << 16 {
        return Err(ProbeError::MysqlMalformed);
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((head[3], body))
}

/// Validates an Initial Handshake packet payload (protocol 10), or decodes an error packet.
pub fn parse_greeting(p: &[u8]) -> Result<(), ProbeError> {
    match p.first() {
        Some(0xff) => Err(parse_error(p)),
        Some(10) => {
            // server version, NUL-terminated, printable
            let nul = p[1..]
                .iter()
                .position(|&b| b == 0)
                .ok_or(ProbeError::MysqlMalformed)?;
            let version = &p[1..1 + nul];
            if version.is_empty() || !version.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                return Err(ProbeError::MysqlMalformed);
            }
            let rest = &p[2 + nul..];
            // connection id (4), auth-plugin-data part 1 (8), filler 0x00, capabilities low (2)
            if rest.len() < 4 + 8 + 1 + 2 || rest[12] != 0 {
                return Err(ProbeError::MysqlMalformed);
            }
            Ok(())
        }
        Some(v) => Err(ProbeError::MysqlProtocol(*v)),
        None => Err(ProbeError::MysqlMalformed),
    }
}

fn parse_error(p: &[u8]) -> ProbeError {
    if p.len() < 3 {
        return ProbeError::MysqlMalformed;
    }
    let code = u16::from_le_bytes([p[1], p[2]]);
    let mut msg = &p[3..];
    if msg.first() == Some(&b'#') && msg.len() >= 6 {
        msg = &msg[6..];
    }
    ProbeError::MysqlError {
        code,
        message: String::from_utf8_lossy(msg).into_owned(),
    }
}

/// `HandshakeResponse41` for user `portico`, no password, no database; sequence id 1.
pub fn login_packet() -> Vec<u8> {
    const CLIENT_PROTOCOL_41: u32 = 0x0200;
    const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
    let mut body = Vec::with_capacity(48);
    body.extend_from_slice(&(CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION).to_le_bytes());
    body.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet
    body.push(33); // utf8_general_ci
    body.extend_from_slice(&[0u8; 23]);
    body.extend_from_slice(b"portico\0");
    body.push(0); // empty auth response
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes()[..3]);
    out.push(1);
    out.extend_from_slice(&body);
    out
}

/// `COM_QUIT`, sequence id 0.
pub const COM_QUIT: [u8; 5] = [1, 0, 0, 0, 1];

async fn mysql(s: &mut TcpStream) -> Result<(), ProbeError> {
    let (_, greeting) = read_packet(s).await?;
    parse_greeting(&greeting)?;
    s.write_all(&login_packet()).await?;
    let (_, answer) = read_packet(s).await?;
    let verdict = login_answer(&answer);
    if answer.first() == Some(&0x00) {
        let _ = s.write_all(&COM_QUIT).await;
    }
    let _ = s.shutdown().await;
    verdict
}

/// The server's answer to the login: OK (0x00), an auth switch (0xfe) or an authentication
/// error (0xff, e.g. 1045 access denied) prove it serves; an error saying it takes no more
/// connections (1040 too many connections, 1203 user limit, 1129 host blocked) means down —
/// MariaDB checks `max_connections` only after authentication, so 1040 arrives here.
pub fn login_answer(answer: &[u8]) -> Result<(), ProbeError> {
    match answer.first() {
        Some(0x00 | 0xfe) => Ok(()),
        Some(0xff) => match parse_error(answer) {
            e @ ProbeError::MysqlError {
                code: 1040 | 1203 | 1129,
                ..
            } => Err(e),
            ProbeError::MysqlError { .. } => Ok(()),
            other => Err(other),
        },
        _ => Err(ProbeError::MysqlMalformed),
    }
}

/// A random first delay within one interval.
pub fn first_delay(interval: Duration, rng: &mut impl rand::Rng) -> Duration {
    interval.mul_f64(rng.random_range(0.0..1.0))
}

/// `interval` ± 10 %.
pub fn next_delay(interval: Duration, rng: &mut impl rand::Rng) -> Duration {
    interval.mul_f64(rng.random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from MariaDB 10.11 (greeting trimmed after the capability flags and a bit more).
    const GREETING: &[u8] = b"\x0a10.11.6-MariaDB\x00\x2a\x00\x00\x00\x41\x42\x43\x44\x45\x46\x47\x48\x00\xfe\xf7\x2d\x02\x00";
    // A pre-handshake "Too many connections" error packet as mariadbd sends it.
    const TOO_MANY: &[u8] = b"\xff\x10\x04Too many connections";

    #[test]
    fn greeting_with_protocol_10_is_valid() {
        parse_greeting(GREETING).unwrap();
    }

    #[test]
    fn error_packet_is_down_with_code() {
        match parse_greeting(TOO_MANY) {
            Err(ProbeError::MysqlError {
                code: 1040,
                message,
            }) => assert_eq!(message, "Too many connections"),
            other => panic!("{other:?}"),
        }
        match parse_greeting(b"\xff\x15\x04#28000Access denied") {
            Err(ProbeError::MysqlError {
                code: 1045,
                message,
            }) => assert_eq!(message, "Access denied"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_protocol_versions_and_garbage_are_rejected() {
        assert!(matches!(
            parse_greeting(b"\x09abc\x00"),
            Err(ProbeError::MysqlProtocol(9))
        ));
        assert!(matches!(
            parse_greeting(b"\x0a\x00"),
            Err(ProbeError::MysqlMalformed)
        ));
        assert!(matches!(
            parse_greeting(b"\x0a5.7\x00\x01\x02"),
            Err(ProbeError::MysqlMalformed)
        ));
    }

    #[test]
    fn login_answers_classify_refusal_as_down_and_auth_errors_as_up() {
        assert!(login_answer(b"\x00\x00\x00\x02\x00\x00\x00").is_ok());
        assert!(login_answer(b"\xff\x15\x04#28000Access denied for user 'portico'").is_ok());
        assert!(matches!(
            login_answer(b"\xff\x10\x04#08004Too many connections"),
            Err(ProbeError::MysqlError { code: 1040, .. })
        ));
        assert!(login_answer(b"").is_err());
    }

    #[test]
    fn login_packet_encodes_to_fixed_bytes() {
        let p = login_packet();
        assert_eq!(&p[..4], &[41, 0, 0, 1]);
        assert_eq!(&p[4..8], &[0x00, 0x82, 0x00, 0x00]);
        assert_eq!(&p[36..45], b"portico\0\0");
    }

    #[test]
    fn http_status_line_parses() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204 No Content\r\n").unwrap(),
            Some(204)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 20").unwrap(), None);
        assert!(parse_status_line(b"SSH-2.0\r\n").is_err());
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let d = next_delay(Duration::from_secs(2), &mut rng);
            assert!(d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200));
        }
    }
}
