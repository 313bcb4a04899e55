//! Root only: addresses added through `sys::addr_add` carry portico's mark and are listed again
//! by `sys::addrs_with_proto`; the host's own addresses never are. Runs in a network namespace
//! it creates and always removes.

use std::net::IpAddr;
use std::process::Command;

/// Linux records IFA_PROTO since 6.3.
fn kernel_records_proto() -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 3)
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn marked_addresses_are_ours_and_the_hosts_are_not() {
    if !sys::is_root() {
        sys::skip_test("needs root (a network namespace, netlink address changes)");
        return;
    }
    if !kernel_records_proto() {
        sys::skip_test("this kernel does not record IFA_PROTO (Linux < 6.3)");
        return;
    }
    let ns = Netns(format!("ptsys{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    // an address the host has on lo by itself
    assert!(
        Command::new("ip")
            .args(["-n", &ns.0, "addr", "add", "10.123.0.5/32", "dev", "lo"])
            .status()
            .unwrap()
            .success()
    );
    let path = format!("/run/netns/{}", ns.0);
    let r = std::thread::spawn(move || -> Result<_, sys::Error> {
        sys::setns_net(&path)?;
        let lo = sys::if_index("lo")?;
        let added = sys::addr_add(lo, ip("10.123.0.100"), 32)?;
        let again = sys::addr_add(lo, ip("10.123.0.100"), 32)?;
        let hosts = sys::addr_add(lo, ip("10.123.0.5"), 32)?;
        let v6 = sys::addr_add(lo, ip("fd00:123::100"), 128)?;
        let mut marked = sys::addrs_with_proto(lo, sys::ADDR_PROTO)?;
        marked.sort();
        sys::addr_del(lo, ip("10.123.0.100"), 32)?;
        let after = sys::addrs_with_proto(lo, sys::ADDR_PROTO)?;
        Ok((added, again, hosts, v6, marked, after))
    })
    .join()
    .expect("netns thread")
    .expect("netlink calls");
    let (added, again, hosts, v6, marked, after) = r;
    assert!(added && v6, "new addresses are reported as added");
    assert!(!again, "adding twice reports the address as already there");
    assert!(!hosts, "the host's own address is not ours");
    assert_eq!(marked, vec![ip("10.123.0.100"), ip("fd00:123::100")]);
    assert_eq!(after, vec![ip("fd00:123::100")]);
}

#[test]
fn host_addresses_name_every_interface_with_its_prefix() {
    // loopback exists in every namespace; its IPv4 address is 127.0.0.1/8
    let all = sys::host_addresses().expect("an RTM_GETADDR dump needs no privilege");
    assert!(
        all.iter().any(|(name, ip, prefix)| name == "lo"
            && ip.to_string() == "127.0.0.1"
            && *prefix == 8),
        "{all:?}"
    );
}
