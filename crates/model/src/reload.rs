//! What a reload may change: the fields a running node reads only at start-up.
//!
//! A reload that changes one of them is refused as a whole with `needs restart: <fields>`, so
//! the running generation never claims a value the node does not use. Everything else
//! (services, backends, policies, DNS zones, peers, keys, `preemptive`, `hold_down`) is
//! applied live, also `node.interfaces` and `cluster.announce.*` (the agent reopens its
//! announcers).

use crate::service::Config;

/// The fields that differ between the running configuration and `new` but can only take
/// effect on a restart, as dotted paths in document order (empty: the reload may apply).
///
/// - `cluster.profile`: the membership protocol's (SWIM's) timers are built when gossip starts;
/// - `cluster.priority`: the agent's thread is made (and scheduled) at start;
/// - `admin.listen`, `dns.listen`: the sockets are bound at start; adding or removing the
///   `dns` section counts as a change of `dns.listen` (the DNS server runs or not from start);
/// - `node.name`, `cluster.bind`, `cluster.advertise`: the gossip socket and this node's
///   identity in the membership protocol, once it gossips. `running` must be the
///   configuration the gossip started with: while it has no peers nothing uses these three,
///   so they may change (a node that gets its first peers by a reload starts gossip then);
/// - `proxy.workers`, `proxy.io`: the balancer's worker threads and how they relay are set
///   when the process starts.
///
/// `cluster.peers` is not on the list: peers are applied live. Nor is anything under `bgp`
/// (adding or removing the section included): the speaker always runs and a changed peer,
/// AS or router id restarts only the sessions it changes.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (running, new);
    let gossiping = !a.cluster.peers.is_empty();
    let checks = [
        ("node.name", gossiping && a.node.name != b.node.name),
        (
            "cluster.bind",
            gossiping && a.cluster.bind != b.cluster.bind,
        ),
        (
            "cluster.advertise",
            gossiping && a.cluster.advertise != b.cluster.advertise,
        ),
        ("cluster.profile", a.cluster.profile != b.cluster.profile),
        ("cluster.priority", a.cluster.priority != b.cluster.priority),
        ("admin.listen", a.admin.listen != b.admin.listen),
        (
            "dns.listen",
            a.dns.as_ref().map(|d| d.listen) != b.dns.as_ref().map(|d| d.listen),
        ),
        // the balancer's worker threads are started once, with the process
        ("proxy.workers", a.proxy.workers != b.proxy.workers),
        ("proxy.io", a.proxy.io != b.proxy.io),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(field, _)| field)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Environment, parse};

    const KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

    fn cfg(extra: &str) -> Config {
        parse(extra, &Environment::default()).unwrap_or_else(|e| panic!("{e}\n{extra}"))
    }

    fn clustered(extra: &str) -> String {
        format!(
            "node: {{name: a, interfaces: [{{name: eth0, addresses: [10.0.0.11/24]}}]}}\ncluster:\n  bind: 10.0.0.11:7946\n  keys: [{{id: 1, secret: {KEY}}}]\n  peers: [{{name: b, address: 10.0.0.12:7946}}]\n{extra}"
        )
    }

    #[test]
    fn each_start_up_field_is_named_when_it_changes() {
        let base = cfg(&clustered(""));
        let cases: &[(&str, &[&str])] = &[
            ("  profile: fast\n", &["cluster.profile"]),
            ("  priority: normal\n", &["cluster.priority"]),
            ("  advertise: 10.0.0.99:7946\n", &["cluster.advertise"]),
            ("admin: {listen: 127.0.0.1:9441}\n", &["admin.listen"]),
            (
                "dns: {listen: 127.0.0.1:5353, zones: [{name: lb.example}]}\n",
                &["dns.listen"],
            ),
        ];
        for (extra, want) in cases {
            let new = cfg(&clustered(extra));
            assert_eq!(needs_restart(&base, &new), *want, "{extra}");
        }
        let renamed = cfg(&clustered("").replace("name: a,", "name: c,"));
        assert_eq!(needs_restart(&base, &renamed), ["node.name"]);
        let rebound = cfg(&clustered("").replace("bind: 10.0.0.11:7946", "bind: 10.0.0.11:7947"));
        assert_eq!(
            needs_restart(&base, &rebound),
            ["cluster.bind", "cluster.advertise"]
        );
        let more_ifs = cfg(&clustered("").replace(
            "interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]",
            "interfaces: [{name: eth0, addresses: [10.0.0.11/24]}, {name: eth1, addresses: [10.1.0.11/24]}]",
        ));
        assert!(
            needs_restart(&base, &more_ifs).is_empty(),
            "interfaces apply live"
        );
        // several at once, in document order
        let many = cfg(&clustered(
            "  profile: fast\nadmin: {listen: 127.0.0.1:1}\n",
        ));
        assert_eq!(
            needs_restart(&base, &many),
            ["cluster.profile", "admin.listen"]
        );
    }

    #[test]
    fn proxy_workers_need_a_restart() {
        let one = cfg("proxy: {workers: 1}\n");
        let two = cfg("proxy: {workers: 2}\n");
        assert_eq!(needs_restart(&one, &two), ["proxy.workers"]);
        assert_eq!(needs_restart(&cfg(""), &one), ["proxy.workers"]);
        assert!(needs_restart(&two, &cfg("proxy: {workers: 2}\n")).is_empty());
        let epoll = cfg("proxy: {workers: 2, io: epoll}\n");
        assert_eq!(needs_restart(&two, &epoll), ["proxy.io"]);
        assert!(needs_restart(&two, &cfg("proxy: {workers: 2, io: uring}\n")).is_empty());
    }

    #[test]
    fn dns_appearing_or_going_needs_a_restart_but_its_zones_do_not() {
        let dns = |zone: &str| cfg(&format!("dns: {{zones: [{{name: {zone}}}]}}\n"));
        assert_eq!(needs_restart(&cfg(""), &dns("a.example")), ["dns.listen"]);
        assert_eq!(needs_restart(&dns("a.example"), &cfg("")), ["dns.listen"]);
        assert!(needs_restart(&dns("a.example"), &dns("b.example")).is_empty());
    }

    #[test]
    fn live_fields_never_need_a_restart() {
        let base = cfg(&clustered(""));
        for extra in [
            "  announce: {count: 5, interval: 50ms, refresh: 0s}\n",
            "  preemptive: false\n",
            "  hold_down: 1s\n",
            "services:\n  - name: web\n    vips: [10.0.0.100]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
        ] {
            let new = cfg(&clustered(extra));
            assert!(needs_restart(&base, &new).is_empty(), "{extra}");
        }
        let other_key = cfg(&clustered("").replace(KEY, &"ab".repeat(32)));
        assert!(needs_restart(&base, &other_key).is_empty());
        let more_peers = cfg(&clustered("").replace(
            "peers: [{name: b, address: 10.0.0.12:7946}]",
            "peers: [{name: b, address: 10.0.0.12:7946}, {name: c, address: 10.0.0.13:7946}]",
        ));
        assert!(needs_restart(&base, &more_peers).is_empty());
    }

    #[test]
    fn gossip_identity_may_change_until_the_node_gossips() {
        // started without peers: the first peers may come with a new bind, advertise and name
        let alone = cfg("node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\n");
        let joined = cfg(&clustered("  advertise: 10.0.0.11:7946\n"));
        assert!(needs_restart(&alone, &joined).is_empty());
        let renamed =
            cfg("node: {name: z, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\n");
        assert!(needs_restart(&alone, &renamed).is_empty());
        // once gossiping they may not
        assert_eq!(
            needs_restart(&joined, &cfg(&clustered("  advertise: 10.0.0.99:7946\n"))),
            ["cluster.advertise"]
        );
    }
}
