//! The one crate allowed `unsafe`: raw packet sockets, socket options, netlink and sysctls.
//!
//! * [`PacketSocket`]: an `AF_PACKET` raw socket bound to one interface and one EtherType,
//!   driven by tokio (`AsyncFd`), with an optional classic-BPF filter. The only `unsafe` is
//!   building the `sockaddr_ll` to bind it, its registration with tokio (in `netlink`) and
//!   `setns(2)` for the lab.
//! * [`addr_add`] / [`addr_del`] / [`addrs_with_proto`]: `RTM_NEWADDR` / `RTM_DELADDR` /
//!   `RTM_GETADDR` dumps over `NETLINK_ROUTE`, built and parsed by hand (no `unsafe`: the kernel
//!   is the default destination of an unconnected socket). Added addresses carry portico's
//!   [`ADDR_PROTO`], so a restart removes exactly what a crashed agent left.
//! * [`sysctl_read`] / [`sysctl_write`], [`if_index`], [`if_mac`]: plain `/proc` and `/sys`
//!   files.
//! * [`limits`]: raising `RLIMIT_NOFILE`, telling local resource shortages (`EMFILE`…) from
//!   peer failures, and logging a repeating condition once per interval.
//! * [`conn_table`]: the pure bounded table of connections or sessions (per-client limit,
//!   eviction of the oldest idle entry under pressure) the listeners share.
//! * [`tcp_md5`] and [`ttl`]: the BGP speaker's socket options: TCP MD5 signatures (RFC 2385),
//!   TTL 255 sent, a minimum TTL on TCP reception, the TTL of each received BFD datagram.
//! * [`nft_set`]: nftables map element changes as one netlink batch, without nft's parser
//!   (the kernel path's health changes).
//! * [`nftables`]: libnftables loaded with `dlopen` (no link-time dependency), one context
//!   running nft batches in-process for the kernel path.
//! * [`uring`]: an io_uring with a ring of provided buffers for the proxy's relay; it closes
//!   a socket only when no operation on it is in flight and recycles a buffer only when no
//!   send reads it.
//! * [`accept`]: a TCP listener on tokio's poller whose accepted sockets are registered only
//!   by the worker that serves them.
//! * `netlink` (crate-private): the netlink plumbing of [`conntrack`], [`nft_set`] and the
//!   address requests (headers, attributes, acknowledgements, sockets), and the tokio
//!   registration and receive loop of [`PacketSocket`] and the conntrack event socket.

pub mod accept;
pub mod conn_table;
pub mod conntrack;
pub mod limits;
mod netlink;
pub mod nft_set;
pub mod nftables;
pub mod tcp_info;
pub mod tcp_md5;
pub mod ttl;
pub mod uring;

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;

use netlink::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};

/// Errors of the system helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An interface name that does not exist.
    #[error("interface {name}: {source}")]
    Interface {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A sysctl that could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A socket or netlink operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<netlink::Error> for Error {
    fn from(netlink::Error { what, source }: netlink::Error) -> Self {
        Self::Io { what, source }
    }
}

/// Signals the lab sends.
pub use libc::{SIGKILL, SIGTERM};

/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// Whether this process runs as root (uid 0, from `/proc/self/status`): the lab and the
/// root-only tests check it before creating namespaces or raw sockets.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether every test must run here: CI sets `PORTICO_CI` (`.ci/run`), and then a test that
/// lacks root, a package, IPv6 loopback or a kernel feature fails instead of skipping.
pub fn tests_must_run() -> bool {
    std::env::var_os("PORTICO_CI").is_some()
}

/// Where a test cannot run here: prints `skipped: <reason>` locally, and panics with the
/// reason in CI ([`tests_must_run`]), so that a skipped test can never pass there.
pub fn skip_test(reason: &str) {
    assert!(
        !tests_must_run(),
        "this test must run in CI (PORTICO_CI is set) but cannot: {reason}"
    );
    println!("skipped: {reason}");
}

/// The kernel index of interface `name` in the calling thread's network namespace
/// (`if_nametoindex(3)`, which asks the kernel through a socket, unlike `/sys` which shows the
/// namespace it was mounted in).
pub fn if_index(name: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(name).map_err(|_| Error::Interface {
        name: name.into(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    #[allow(unsafe_code)]
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(Error::Interface {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// The MAC address of interface `name`.
pub fn if_mac(name: &str) -> Result<[u8; 6], Error> {
    let path = format!("/sys/class/net/{name}/address");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Interface {
        name: name.into(),
        source,
    })?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes.try_into().map_err(|_| Error::Interface {
        name: name.into(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a MAC address in {path}"),
        ),
    })
}

/// Reads a sysctl (`net/ipv4/conf/eth0/arp_ignore` → `/proc/sys/net/ipv4/conf/eth0/arp_ignore`).
pub fn sysctl_read(key: &str) -> Result<String, Error> {
    let path = format!("/proc/sys/{key}");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| Error::Sysctl { path, source })
}

/// A sysctl this process changed: its key, the value it had before, the value written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlChange {
    /// The key (`net/ipv4/conf/eth0/arp_ignore`).
    pub key: String,
    /// The value before this process first wrote it.
    pub before: String,
    /// The value this process last wrote.
    pub written: String,
}

/// Every sysctl changed through [`sysctl_write`], in the order first changed.
static CHANGED: std::sync::Mutex<Vec<SysctlChange>> = std::sync::Mutex::new(Vec::new());

/// Writes a sysctl, remembering the value it replaces the first time this process changes the
/// key, so [`sysctl_restore`] can put it back at exit.
pub fn sysctl_write(key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/{key}");
    let before = sysctl_read(key).ok();
    std::fs::write(&path, value).map_err(|source| Error::Sysctl { path, source })?;
    let mut changed = CHANGED.lock().unwrap_or_else(|p| p.into_inner());
    match changed.iter_mut().find(|c| c.key == key) {
        Some(c) => c.written = value.to_string(),
        None => {
            if let Some(before) = before.filter(|b| b != value) {
                changed.push(SysctlChange {
                    key: key.to_string(),
                    before,
                    written: value.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Puts back every sysctl [`sysctl_write`] changed in this process, last changed first, and
/// forgets them. A key whose value is no longer the one written (someone changed it since) is
/// left as it is. Returns each change with the outcome: `Ok(true)` restored, `Ok(false)` left.
pub fn sysctl_restore() -> Vec<(SysctlChange, Result<bool, Error>)> {
    let changes = std::mem::take(&mut *CHANGED.lock().unwrap_or_else(|p| p.into_inner()));
    changes
        .into_iter()
        .rev()
        .map(|c| {
            let outcome = match sysctl_read(&c.key) {
                Ok(now) if now == c.written => {
                    let path = format!("/proc/sys/{}", c.key);
                    std::fs::write(&path, &c.before)
                        .map(|()| true)
                        .map_err(|source| Error::Sysctl { path, source })
                }
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            };
            (c, outcome)
        })
        .collect()
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`).
/// Sockets created afterwards on this thread live in that namespace.
pub fn setns_net(path: &str) -> Result<(), Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        what: "open netns",
        source,
    })?;
    #[allow(unsafe_code)]
    // SAFETY: `file` is an open descriptor for the duration of the call; CLONE_NEWNET only
    // changes this thread's network namespace, which touches no Rust-visible memory.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::Io {
            what: "setns",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Sends signal `sig` (`libc::SIGTERM`, `libc::SIGKILL`, ...) to process `pid`.
pub fn kill(pid: u32, sig: i32) -> Result<(), Error> {
    let pid = i32::try_from(pid).map_err(|_| Error::Io {
        what: "kill",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(Error::Io {
            what: "kill",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Sets the nice value of the calling thread only (Linux keeps one per thread): the agent's
/// heartbeat thread runs at a raised priority so that busy processes on the host do not delay
/// its heartbeats. Lowering it below 0 needs `CAP_SYS_NICE` (root).
pub fn set_thread_nice(nice: i32) -> Result<(), Error> {
    #[allow(unsafe_code)]
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    #[allow(unsafe_code)]
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(Error::Io {
            what: "setpriority",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Puts the calling thread under real-time round-robin scheduling (`SCHED_RR`) at `priority`
/// (1–99): it then runs before every normally scheduled thread of the host, as keepalived's
/// `vrrp_rt_priority` does for VRRP. The kernel's real-time throttling
/// (`kernel.sched_rt_runtime_us`, 95 % by default) keeps a runaway thread from starving the
/// host. Needs `CAP_SYS_NICE`, and inside a cgroup with its own CPU controller a real-time
/// budget; without them this fails with `EPERM`.
pub fn set_thread_realtime(priority: i32) -> Result<(), Error> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    #[allow(unsafe_code)]
    // SAFETY: sched_setscheduler(2) with pid 0 (the calling thread) reads the parameter struct
    // we own for the duration of the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
    if rc != 0 {
        return Err(Error::Io {
            what: "sched_setscheduler",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// An `AF_PACKET` raw socket on one interface and EtherType, read and written whole frames.
#[derive(Debug)]
pub struct PacketSocket {
    fd: AsyncFd<Socket>,
}

/// A classic BPF program accepting only ICMPv6 neighbour solicitations without extension
/// headers (`ip6[6] == 58 && ip6[40] == 135`) on an Ethernet frame.
pub fn bpf_neighbor_solicitation() -> Vec<SockFilter> {
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    vec![
        SockFilter::new(LDB_ABS, 0, 0, 14 + 6),
        SockFilter::new(JEQ_K, 0, 3, 58),
        SockFilter::new(LDB_ABS, 0, 0, 14 + 40),
        SockFilter::new(JEQ_K, 0, 1, 135),
        SockFilter::new(RET_K, 0, 0, 0xffff),
        SockFilter::new(RET_K, 0, 0, 0),
    ]
}

impl PacketSocket {
    /// Opens a raw socket on interface index `ifindex` for EtherType `ethertype`.
    /// Must be called inside a tokio runtime.
    pub fn open(
        ifindex: u32,
        ethertype: u16,
        filter: Option<&[SockFilter]>,
    ) -> Result<Self, Error> {
        let io = |what| move |source| Error::Io { what, source };
        let proto = i32::from(ethertype.to_be());
        let sock = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(proto)))
            .map_err(io("AF_PACKET socket (needs CAP_NET_RAW)"))?;
        if let Some(f) = filter {
            sock.attach_filter(f).map_err(io("attach BPF filter"))?;
        }
        let ll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: ethertype.to_be(),
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        #[allow(unsafe_code)]
        // SAFETY: `try_init` hands us storage of `sockaddr_storage` size, which is larger than
        // and aligned for `sockaddr_ll`; we write one whole `sockaddr_ll` and report its size.
        let (_, addr) = unsafe {
            SockAddr::try_init(|storage, len| {
                std::ptr::write(storage.cast::<libc::sockaddr_ll>(), ll);
                *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                Ok(())
            })
        }
        .map_err(io("sockaddr_ll"))?;
        sock.bind(&addr).map_err(io("bind AF_PACKET socket"))?;
        Ok(Self {
            fd: netlink::register(sock)?,
        })
    }

    /// Receives one frame (Ethernet header included).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        netlink::recv(&self.fd, buf).await
    }

    /// Sends one whole frame out of the bound interface.
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|s| s.get_ref().send(frame)) {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_HOST: u8 = 254;
const IFA_PROTO: u16 = 11;
const RTM_GETADDR: u16 = 22;

/// The `IFA_PROTO` value (Linux 6.3 and newer record it) that marks addresses portico added, so
/// that a restart removes exactly the addresses a crashed agent left and never the host's own.
/// Kernels before 6.3 ignore the attribute and report none: nothing is then removed at start.
pub const ADDR_PROTO: u8 = 0x70;

/// Builds an `RTM_NEWADDR`/`RTM_DELADDR` request (native endian, as netlink is).
///
/// ```text
/// nlmsghdr  len u32 | type u16 | flags u16 | seq u32 | pid u32
/// ifaddrmsg family u8 | prefixlen u8 | flags u8 | scope u8 | index u32
/// rtattr    len u16 | type u16 (IFA_LOCAL)   | address (4 or 16)
/// rtattr    len u16 | type u16 (IFA_ADDRESS) | address
/// rtattr    len u16 | type u16 (IFA_PROTO)   | ADDR_PROTO u8 | pad      (RTM_NEWADDR only)
/// ```
pub fn addr_message(add: bool, ifindex: u32, ip: IpAddr, prefix: u8, seq: u32) -> Vec<u8> {
    let (family, octets): (u8, Vec<u8>) = match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut m = Vec::with_capacity(64);
    let flags = NLM_F_REQUEST | NLM_F_ACK | if add { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
    let kind = if add { RTM_NEWADDR } else { RTM_DELADDR };
    let at = netlink::begin(&mut m, kind, flags, seq);
    m.extend_from_slice(&[
        family,
        prefix,
        if ip.is_ipv6() { IFA_F_NODAD } else { 0 },
        RT_SCOPE_HOST,
    ]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    for kind in [IFA_LOCAL, IFA_ADDRESS] {
        netlink::attr(&mut m, kind, &octets);
    }
    if add {
        netlink::attr(&mut m, IFA_PROTO, &[ADDR_PROTO]);
    }
    netlink::finish(&mut m, at);
    m
}

fn netlink_request(msg: &[u8]) -> io::Result<()> {
    let sock = netlink::open(libc::NETLINK_ROUTE).map_err(|e| e.source)?;
    sock.send(msg)?;
    let mut buf = [0u8; 4096];
    for _ in 0..8 {
        let n = io::Read::read(&mut &sock, &mut buf)?;
        if n < 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink reply",
            ));
        }
        let msg = &buf[..n];
        if netlink::u16_at(msg, 4) == Some(NLMSG_ERROR) {
            return netlink::check(netlink::error_code(msg).unwrap_or(0));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no netlink acknowledgement",
    ))
}

/// Adds `ip/prefix` to interface `ifindex` (host scope; IPv6 without DAD; marked with
/// [`ADDR_PROTO`]). Returns `false` when the address was there already (then it is not ours to
/// remove).
pub fn addr_add(ifindex: u32, ip: IpAddr, prefix: u8) -> Result<bool, Error> {
    match netlink_request(&addr_message(true, ifindex, ip, prefix, 1)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(source) => Err(Error::Io {
            what: "netlink RTM_NEWADDR",
            source,
        }),
    }
}

/// Removes `ip/prefix` from interface `ifindex`. Already absent is success.
pub fn addr_del(ifindex: u32, ip: IpAddr, prefix: u8) -> Result<(), Error> {
    match netlink_request(&addr_message(false, ifindex, ip, prefix, 2)) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::ENOENT)
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(Error::Io {
            what: "netlink RTM_DELADDR",
            source,
        }),
    }
}

/// One address of an `RTM_GETADDR` dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpedAddr {
    /// Interface index.
    pub ifindex: u32,
    /// The address (`IFA_LOCAL` for IPv4, `IFA_ADDRESS` otherwise).
    pub ip: IpAddr,
    /// Prefix length (`ifa_prefixlen`).
    pub prefix: u8,
    /// `IFA_PROTO`, when the kernel records it.
    pub proto: Option<u8>,
}

/// Parses one read of an `RTM_GETADDR` dump: the addresses in it, and whether `NLMSG_DONE`
/// ended it. Truncated or malformed messages end the parse (they come from the kernel, but
/// nothing here may panic on them).
pub fn parse_addr_dump(buf: &[u8]) -> Result<(Vec<DumpedAddr>, bool), io::Error> {
    let mut out = Vec::new();
    for (kind, _, msg) in netlink::messages(buf) {
        match kind {
            NLMSG_DONE => return Ok((out, true)),
            NLMSG_ERROR => netlink::check(netlink::error_code(msg).unwrap_or(0))?,
            RTM_NEWADDR if msg.len() >= 24 => {
                let family = msg[16];
                let prefix = msg[17];
                let ifindex = netlink::u32_at(msg, 20).unwrap_or(0);
                let (mut local, mut address, mut proto) = (None, None, None);
                for (atype, data, _) in netlink::attrs(&msg[24..]) {
                    let ip = match (family as i32, data.len()) {
                        (libc::AF_INET, 4) => {
                            Some(IpAddr::from(<[u8; 4]>::try_from(data).unwrap_or_default()))
                        }
                        (libc::AF_INET6, 16) => {
                            Some(IpAddr::from(<[u8; 16]>::try_from(data).unwrap_or_default()))
                        }
                        _ => None,
                    };
                    match atype {
                        IFA_LOCAL => local = ip,
                        IFA_ADDRESS => address = ip,
                        IFA_PROTO => proto = data.first().copied(),
                        _ => {}
                    }
                }
                if let Some(ip) = local.or(address) {
                    out.push(DumpedAddr {
                        ifindex,
                        ip,
                        prefix,
                        proto,
                    });
                }
            }
            _ => {}
        }
    }
    Ok((out, false))
}

/// The addresses on interface `ifindex` marked with `proto` (see [`ADDR_PROTO`]).
pub fn addrs_with_proto(ifindex: u32, proto: u8) -> Result<Vec<IpAddr>, Error> {
    Ok(dump_addrs()?
        .into_iter()
        .filter(|a| a.ifindex == ifindex && a.proto == Some(proto))
        .map(|a| a.ip)
        .collect())
}

/// The name of interface `index` in the calling thread's network namespace
/// (`if_indextoname(3)`).
pub fn if_name(index: u32) -> Result<String, Error> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` is IF_NAMESIZE bytes, the size if_indextoname writes at most (name and NUL).
    #[allow(unsafe_code)]
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(Error::Io {
            what: "if_indextoname",
            source: io::Error::last_os_error(),
        });
    }
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Every address of every interface in the calling thread's network namespace, with its
/// interface name and prefix: `(interface, address, prefix)`.
pub fn host_addresses() -> Result<Vec<(String, IpAddr, u8)>, Error> {
    let mut names = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for a in dump_addrs()? {
        let name = match names.get(&a.ifindex) {
            Some(n) => n,
            None => names.entry(a.ifindex).or_insert(if_name(a.ifindex)?),
        };
        out.push((name.clone(), a.ip, a.prefix));
    }
    Ok(out)
}

/// One `RTM_GETADDR` dump of every address in the namespace.
fn dump_addrs() -> Result<Vec<DumpedAddr>, Error> {
    let err = |source| Error::Io {
        what: "netlink RTM_GETADDR",
        source,
    };
    let sock = netlink::open(libc::NETLINK_ROUTE).map_err(|e| err(e.source))?;
    let mut req = Vec::with_capacity(24);
    let at = netlink::begin(&mut req, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 3);
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    netlink::finish(&mut req, at);
    sock.send(&req).map_err(err)?;
    let mut buf = vec![0u8; 65536];
    let mut found = Vec::new();
    // bounded: a dump of even thousands of addresses is a few reads
    for _ in 0..10_000 {
        let n = io::Read::read(&mut &sock, &mut buf).map_err(err)?;
        let (addrs, done) = parse_addr_dump(&buf[..n]).map_err(err)?;
        found.extend(addrs);
        if done {
            return Ok(found);
        }
    }
    Err(err(io::Error::new(
        io::ErrorKind::InvalidData,
        "netlink dump did not end",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deletes the network namespace on drop.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    #[test]
    fn sysctl_writes_are_restored_and_others_changes_are_left() {
        if !is_root() {
            skip_test("needs root (a network namespace)");
            return;
        }
        let name = format!("portico-sys-sysctl-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        let ns = Netns(name);
        let path = format!("/run/netns/{}", ns.0);
        // /proc/sys/net follows the namespace of the thread that opens it
        std::thread::spawn(move || {
            setns_net(&path).unwrap();
            let (ignore, announce) = (
                "net/ipv4/conf/lo/arp_ignore",
                "net/ipv4/conf/lo/arp_announce",
            );
            let before = (sysctl_read(ignore).unwrap(), sysctl_read(announce).unwrap());
            assert_eq!(before, ("0".to_string(), "0".to_string()));
            sysctl_write(ignore, "1").unwrap();
            sysctl_write(ignore, "2").unwrap();
            sysctl_write(announce, "2").unwrap();
            // someone else changes arp_announce after us: left as they set it
            std::fs::write(format!("/proc/sys/{announce}"), "1").unwrap();
            let restored = sysctl_restore();
            assert_eq!(restored.len(), 2);
            assert_eq!(
                sysctl_read(ignore).unwrap(),
                "0",
                "restored to the first value"
            );
            assert_eq!(
                sysctl_read(announce).unwrap(),
                "1",
                "someone else's value kept"
            );
            assert!(
                sysctl_restore().is_empty(),
                "restore forgets what it restored"
            );
        })
        .join()
        .unwrap();
        drop(ns);
    }

    /// One `RTM_NEWADDR` dump message: ifindex 1, 10.0.0.100/32 with IFA_PROTO 0x70.
    fn dumped_v4() -> Vec<u8> {
        let mut m = addr_message(true, 1, "10.0.0.100".parse().unwrap(), 32, 9);
        m[6..8].copy_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m
    }

    fn done() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m
    }

    #[test]
    fn addr_dump_is_parsed_with_its_proto() {
        let mut buf = dumped_v4();
        // an address without IFA_PROTO (the host's own, or a kernel before 6.3)
        let mut v6 = addr_message(false, 2, "fd00::100".parse().unwrap(), 128, 9);
        v6[4..6].copy_from_slice(&RTM_NEWADDR.to_ne_bytes());
        buf.extend_from_slice(&v6);
        let (addrs, end) = parse_addr_dump(&buf).unwrap();
        assert!(!end);
        assert_eq!(
            addrs,
            vec![
                DumpedAddr {
                    ifindex: 1,
                    ip: "10.0.0.100".parse().unwrap(),
                    prefix: 32,
                    proto: Some(ADDR_PROTO)
                },
                DumpedAddr {
                    ifindex: 2,
                    ip: "fd00::100".parse().unwrap(),
                    prefix: 128,
                    proto: None
                },
            ]
        );
        buf.extend_from_slice(&done());
        assert!(parse_addr_dump(&buf).unwrap().1);
    }

    #[test]
    fn truncated_or_garbled_dumps_never_panic() {
        let full = [dumped_v4(), done()].concat();
        for cut in 0..full.len() {
            let _ = parse_addr_dump(&full[..cut]);
        }
        let mut bad = dumped_v4();
        bad[24..26].copy_from_slice(&0xffffu16.to_ne_bytes()); // attribute longer than message
        let _ = parse_addr_dump(&bad);
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes()); // message shorter than a header
        assert_eq!(parse_addr_dump(&bad).unwrap(), (vec![], false));
    }

    #[test]
    fn rtm_newaddr_layout() {
        let m = addr_message(true, 1, "10.0.0.100".parse().unwrap(), 32, 7);
        assert_eq!(m.len(), 16 + 8 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 48);
        let proto_attr = [
            &5u16.to_ne_bytes()[..],
            &IFA_PROTO.to_ne_bytes(),
            &[ADDR_PROTO, 0, 0, 0],
        ]
        .concat();
        assert_eq!(&m[40..48], &proto_attr[..]);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 32, 0, RT_SCOPE_HOST]);
        assert_eq!(&m[28..32], &[10, 0, 0, 100]);
        let m6 = addr_message(false, 1, "fd00::100".parse().unwrap(), 128, 7);
        assert_eq!(m6.len(), 16 + 8 + 20 + 20);
        assert_eq!(m6[18], IFA_F_NODAD);
    }

    #[test]
    fn loopback_is_index_one() {
        if let Ok(i) = if_index("lo") {
            assert_eq!(i, 1);
        }
    }
}
