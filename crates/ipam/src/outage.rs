//! Logging a retried operation's outage once: when it starts and when it ends, not per attempt.
//!
//! During an API server outage every watch, the leader election and every failed write retry on
//! their own schedules; logging each attempt buried the log (an ERROR and a WARN every 2 s per
//! replica). An [`Outage`] says when a line is due: at the first failure and at the recovery.

/// Counts the failed attempts of one retried operation since its last success.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outage {
    failures: u64,
}

impl Outage {
    /// Records a failure; `true` for the first of an outage (log it), `false` for the others.
    pub fn failed(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// Records a success; the number of failed attempts of the outage that just ended, if one
    /// did (log it).
    pub fn recovered(&mut self) -> Option<u64> {
        let n = std::mem::take(&mut self.failures);
        (n > 0).then_some(n)
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

/// A kube error in one line for a log: `404 NotFound: ippools "x" not found` rather than
/// kube's `ApiError: … (Status { … })` debug dump.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => describe_status(s),
        other => other.to_string(),
    }
}

fn describe_status(s: &kube::core::Status) -> String {
    format!("{} {}: {}", s.code, s.reason, s.message)
}

/// A watcher error in one line (see [`describe`]).
pub fn describe_watch(e: &kube::runtime::watcher::Error) -> String {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(e) => format!("list failed: {}", describe(e)),
        W::WatchStartFailed(e) => format!("watch could not start: {}", describe(e)),
        W::WatchError(s) => format!("watch ended by the API server: {}", describe_status(s)),
        W::WatchFailed(e) => format!("watch stream failed: {}", describe(e)),
        other => other.to_string(),
    }
}

/// A watch stream's items with its errors logged once per outage: a warning at the first
/// failure, debug lines for the retries (the watcher backs off exponentially, 0.8 s doubling to
/// 30 s, see `default_backoff`), and one line when the watch works again.
pub fn logged<K, S>(stream: S, what: &'static str) -> impl futures::Stream<Item = K> + Send
where
    S: futures::Stream<Item = Result<K, kube::runtime::watcher::Error>> + Send,
    K: Send,
{
    use futures::StreamExt;
    stream
        .scan(Outage::default(), move |outage, r| {
            let item = match r {
                Ok(v) => {
                    if let Some(failures) = outage.recovered() {
                        tracing::info!(watch = what, failures, "watch works again");
                    }
                    Some(v)
                }
                Err(e) => {
                    if outage.failed() {
                        tracing::warn!(watch = what, error = %describe_watch(&e), "watch failed; keeping the last known state and retrying with exponential back-off (logged once per outage)");
                    } else {
                        tracing::debug!(watch = what, error = %describe_watch(&e), "watch still failing");
                    }
                    None
                }
            };
            futures::future::ready(Some(item))
        })
        .filter_map(futures::future::ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_error_is_one_line_without_a_debug_dump() {
        let e = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            reason: "NotFound".into(),
            message: "ippools.portico.dev \"gone\" not found".into(),
            ..kube::core::Status::default()
        }));
        let d = describe(&e);
        assert_eq!(d, "404 NotFound: ippools.portico.dev \"gone\" not found");
        assert!(!d.contains("Status {"), "{d}");
    }

    #[test]
    fn an_outage_is_reported_once_when_it_starts_and_once_when_it_ends() {
        let mut o = Outage::default();
        assert_eq!(o.recovered(), None, "no outage, nothing to say");
        assert!(o.failed());
        for _ in 0..29 {
            assert!(!o.failed(), "the same outage is not reported again");
        }
        assert_eq!(o.failures(), 30);
        assert_eq!(o.recovered(), Some(30));
        assert_eq!(o.recovered(), None);
        assert!(o.failed(), "a new outage is reported");
    }
}
