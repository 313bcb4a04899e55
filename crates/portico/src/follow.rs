//! `portico status --watch`: follows a running node's event timeline (`/events`) in the
//! terminal, one line per event, polling every [`POLL`].

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use model::events::Event;

/// How often the timeline is polled.
pub const POLL: Duration = Duration::from_millis(250);
/// Events of the past shown when following starts.
const BACKLOG: usize = 20;

/// One event as a terminal line: `12:00:01.250 health web/b1: up → down`.
pub fn line(e: &Event) -> String {
    let s = e.at_ms / 1000;
    let mut out = format!(
        "{:02}:{:02}:{:02}.{:03} {} {}: {}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        e.at_ms % 1000,
        e.kind,
        e.subject,
        e.message
    );
    if let Some(d) = e.duration_ms {
        out.push_str(&format!(" (without owner {d} ms)"));
    }
    out
}

/// Prints the recent events, then every new one, until the process is interrupted. Survives
/// the node restarting (sequence numbers start again) and short outages of the admin API.
pub async fn follow(addr: SocketAddr, json: bool) -> anyhow::Result<()> {
    let mut since = 0;
    let mut first = true;
    let mut lost = false;
    if !json {
        println!("\nEVENTS (following; Ctrl-C to stop)");
    }
    loop {
        match admin::client::events(addr, since).await {
            Ok(events) => {
                if lost {
                    eprintln!("admin API at {addr} answers again");
                    lost = false;
                }
                let skip = if first {
                    events.len().saturating_sub(BACKLOG)
                } else {
                    0
                };
                first = false;
                let mut out = std::io::stdout().lock();
                for e in events.iter().skip(skip) {
                    if json {
                        writeln!(out, "{}", serde_json::to_string(e)?)?;
                    } else {
                        writeln!(out, "{}", line(e))?;
                    }
                }
                out.flush()?;
                if let Some(last) = events.last() {
                    since = last.seq;
                }
            }
            Err(e) => {
                if !lost {
                    eprintln!("{e}; retrying every {} ms", POLL.as_millis());
                    lost = true;
                }
                // the node may have restarted with fresh sequence numbers
                since = 0;
                first = true;
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_readable_line() {
        let e = Event {
            seq: 3,
            at_ms: 3_723_250,
            kind: "ownerMoved".into(),
            subject: "192.0.2.1".into(),
            message: "n1 → n2 (notOwner)".into(),
            duration_ms: Some(180),
        };
        assert_eq!(
            line(&e),
            "01:02:03.250 ownerMoved 192.0.2.1: n1 → n2 (notOwner) (without owner 180 ms)"
        );
    }
}
