//! The answer snapshot: every response this server can give, prepared ahead from one view of
//! desired state, health and ownership.
//!
//! Answers change only when one of those three changes, so [`Snapshot::build`] renders each
//! `(name, type)` pair's answer, authority and additional sections into bytes once. On the hot
//! path [`crate::respond`] then looks the question name up and copies the prepared bytes after
//! the question it echoes. Every owner name in a prepared section is a compression pointer into
//! that echoed question (offset 12, or the zone apex's suffix of it), which is why a prepared
//! answer is only valid for a question name of the key's length — always true for an exact
//! (case-insensitive) match.
//!
//! Address records of one RRset all have the same size, so round-robin rotation is a rotation
//! of the byte range by whole records ([`Answer::rotation`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use model::{
    BackendKey, Config, DnsAnswerState, DnsMode, DnsNameStatus, HealthView, OwnershipView,
    Protocol, Service, Zone,
};

use crate::wire::{self, CLASS_IN, HEADER_LEN, name_to_wire, pointer, put_rr, rtype};

/// SOA timers (no secondaries exist, so these only inform tools): refresh, retry, expire.
const SOA_REFRESH: u32 = 3600;
const SOA_RETRY: u32 = 600;
const SOA_EXPIRE: u32 = 604_800;
/// SRV priority and weight: one target per name, so RFC 2782's "no choice" values.
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 0;

/// Why a snapshot could not include part of the config (reported, never fatal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildWarning {
    /// A name could not be encoded (too long).
    #[error("service {service}: {source}")]
    Name {
        /// The service.
        service: String,
        /// The encoding error.
        source: wire::WireError,
    },
    /// A service names a zone that the DNS section does not serve.
    #[error("service {service}: zone {zone} is not served")]
    UnknownZone {
        /// The service.
        service: String,
        /// The zone.
        zone: String,
    },
}

/// The fully qualified DNS name of a service in a zone: `<hostname>.<zone>`.
///
/// This is the one place that decides the shape of service names; the Kubernetes source will
/// set `hostname` to `<service>.<namespace>` (or the `portico.dev/hostname` annotation).
pub fn service_fqdn(service: &Service, zone: &Zone) -> String {
    format!(
        "{}.{}",
        service.dns.hostname.trim_end_matches('.'),
        zone.name
    )
}

/// The SRV owner for one port: `_<port-name>._<proto>.<fqdn>`.
pub fn srv_name(port_name: &str, protocol: Protocol, fqdn: &str) -> String {
    format!("_{port_name}._{protocol}.{fqdn}")
}

/// A prepared response body for one `(name, type)` pair.
#[derive(Debug)]
pub struct Answer {
    /// Response code (NOERROR for everything prepared here).
    pub rcode: u8,
    /// Answer records.
    pub ancount: u16,
    /// Authority records.
    pub nscount: u16,
    /// Everything after the question, pointers assuming the question name sits at offset 12.
    pub body: Box<[u8]>,
    /// Round-robin: `(record length, record count)` of the leading address records.
    pub rotation: Option<(usize, usize)>,
    counter: AtomicU32,
}

impl Answer {
    fn new(ancount: u16, nscount: u16, body: Vec<u8>, rotation: Option<(usize, usize)>) -> Self {
        Self {
            rcode: wire::rcode::NOERROR,
            ancount,
            nscount,
            body: body.into_boxed_slice(),
            rotation: rotation.filter(|&(_, n)| n > 1),
            counter: AtomicU32::new(0),
        }
    }

    /// Appends the body, rotated by one more record than the previous call (round robin).
    pub fn write_body(&self, out: &mut Vec<u8>) {
        match self.rotation {
            None => out.extend_from_slice(&self.body),
            Some((len, n)) => {
                let k = self.counter.fetch_add(1, Ordering::Relaxed) as usize % n;
                let (split, end) = (k * len, n * len);
                out.extend_from_slice(&self.body[split..end]);
                out.extend_from_slice(&self.body[..split]);
                out.extend_from_slice(&self.body[end..]);
            }
        }
    }
}

/// Everything prepared for one existing name.
#[derive(Debug)]
pub struct NameEntry {
    /// Index of the zone the name belongs to.
    pub zone: usize,
    a: Option<Answer>,
    aaaa: Option<Answer>,
    ns: Option<Answer>,
    soa: Option<Answer>,
    srv: Option<Answer>,
    any: Answer,
    nodata: Answer,
}

impl NameEntry {
    /// The answer for `qtype`: the RRset, RFC 8482's minimal HINFO for ANY, or NODATA.
    pub fn answer(&self, qtype: u16) -> &Answer {
        let rrset = match qtype {
            rtype::A => &self.a,
            rtype::AAAA => &self.aaaa,
            rtype::NS => &self.ns,
            rtype::SOA => &self.soa,
            rtype::SRV => &self.srv,
            rtype::ANY => return &self.any,
            _ => &None,
        };
        rrset.as_ref().unwrap_or(&self.nodata)
    }
}

/// One served zone.
#[derive(Debug)]
pub struct ZoneData {
    /// Apex, lower-case wire form.
    pub apex: Box<[u8]>,
    /// The SOA record of negative answers after its owner name: TYPE, CLASS, TTL, RDLENGTH
    /// and RDATA (the owner is a pointer to the apex inside the echoed question).
    pub negative_soa: Box<[u8]>,
}

/// Where a question name falls.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// An existing name (possibly an empty non-terminal).
    Name(&'a NameEntry),
    /// Inside a zone, but no such name: NXDOMAIN with the zone's SOA. `apex_at` is the
    /// offset of the apex suffix within the question name.
    NxDomain(&'a ZoneData, usize),
    /// Outside every zone.
    Refused,
}

/// FxHash (rustc's hasher): fast on short byte keys; keys come from the config, never from
/// the network, so flooding the table is not possible.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The prepared answers of one generation of state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Generation of the desired state it was built from.
    pub generation: u64,
    names: HashMap<Box<[u8]>, NameEntry, BuildHasherDefault<FxHasher>>,
    zones: Vec<ZoneData>,
    status: Vec<DnsNameStatus>,
    warnings: Vec<BuildWarning>,
}

/// Addresses of one name while building.
#[derive(Default)]
struct Pending {
    zone: usize,
    ttl: u32,
    addrs: Vec<IpAddr>,
    srv: Vec<Vec<u8>>,
    apex: bool,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The addresses a service publishes now, and in which state.
pub fn service_addresses(
    service: &Service,
    health: &HealthView,
    ownership: &OwnershipView,
) -> (Vec<IpAddr>, DnsAnswerState) {
    let serving = |b: &model::Backend| {
        b.weight > 0
            && health
                .get(&BackendKey::new(service.name.as_str(), b.name.as_str()))
                .copied()
                .unwrap_or_default()
                .is_serving()
    };
    let dedup = |it: &mut dyn Iterator<Item = IpAddr>| {
        let mut v: Vec<IpAddr> = Vec::new();
        for ip in it {
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
        v
    };
    let (healthy, all) = match service.dns.mode {
        DnsMode::Vips => {
            let any_backend = service.backends.iter().any(serving);
            let owned = |ip: &IpAddr| ownership.get(ip).is_none_or(|o| o.owner.is_some());
            let healthy = if any_backend {
                dedup(&mut service.vips.iter().copied().filter(owned))
            } else {
                Vec::new()
            };
            (healthy, dedup(&mut service.vips.iter().copied()))
        }
        DnsMode::Nodes => (
            dedup(
                &mut service
                    .backends
                    .iter()
                    .filter(|b| serving(b))
                    .map(|b| b.address),
            ),
            dedup(&mut service.backends.iter().map(|b| b.address)),
        ),
    };
    if !healthy.is_empty() {
        (healthy, DnsAnswerState::Healthy)
    } else if service.dns.fail_closed {
        (Vec::new(), DnsAnswerState::FailClosed)
    } else {
        (all, DnsAnswerState::FailOpen)
    }
}

impl Snapshot {
    /// Prepares every answer for `config` as `health` and `ownership` stand.
    pub fn build(
        generation: u64,
        config: &Config,
        health: &HealthView,
        ownership: &OwnershipView,
    ) -> Self {
        let mut snap = Snapshot {
            generation,
            ..Default::default()
        };
        let Some(dns) = &config.dns else { return snap };
        let mut pending: BTreeMap<Vec<u8>, Pending> = BTreeMap::new();
        let mut zone_meta = Vec::new();
        for (zi, zone) in dns.zones.iter().enumerate() {
            let Ok(apex) = name_to_wire(&zone.name) else {
                continue;
            };
            let mname = zone
                .ns
                .first()
                .and_then(|n| name_to_wire(n).ok())
                .unwrap_or_else(|| apex.clone());
            let rname = name_to_wire(&zone.admin_email).unwrap_or_else(|_| apex.clone());
            let minimum = secs(zone.negative_ttl);
            let soa = wire::soa_rdata(
                &mname,
                &rname,
                zone.serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                minimum,
            );
            let mut neg = Vec::new();
            put_rr(
                &mut neg,
                &[],
                rtype::SOA,
                CLASS_IN,
                secs(zone.ttl).min(minimum),
                &soa,
            );
            snap.zones.push(ZoneData {
                apex: apex.clone().into_boxed_slice(),
                negative_soa: neg.into_boxed_slice(),
            });
            let ns: Vec<Vec<u8>> = zone
                .ns
                .iter()
                .filter_map(|n| name_to_wire(n).ok())
                .collect();
            zone_meta.push((soa, ns, secs(zone.ttl)));
            let p = pending.entry(apex).or_default();
            p.zone = zi;
            p.apex = true;
            p.ttl = secs(zone.ttl);
        }
        for service in config.services.iter().filter(|s| s.dns.enabled) {
            let zname = service
                .dns
                .zone
                .as_deref()
                .or(dns.zones.first().map(|z| z.name.as_str()));
            let Some((zi, zone)) = dns
                .zones
                .iter()
                .enumerate()
                .find(|(_, z)| Some(z.name.as_str()) == zname)
            else {
                snap.warnings.push(BuildWarning::UnknownZone {
                    service: service.name.clone(),
                    zone: zname.unwrap_or_default().to_string(),
                });
                continue;
            };
            let fqdn = service_fqdn(service, zone);
            let wire_name = match name_to_wire(&fqdn) {
                Ok(w) => w,
                Err(source) => {
                    snap.warnings.push(BuildWarning::Name {
                        service: service.name.clone(),
                        source,
                    });
                    continue;
                }
            };
            let ttl = secs(service.dns.ttl.unwrap_or(zone.ttl));
            let (addrs, state) = service_addresses(service, health, ownership);
            snap.status.push(DnsNameStatus {
                service: service.name.clone(),
                name: fqdn.clone(),
                mode: service.dns.mode,
                state,
                addresses: addrs.clone(),
                ttl,
            });
            let p = pending.entry(wire_name.clone()).or_insert_with(|| Pending {
                zone: zi,
                ttl,
                ..Default::default()
            });
            p.ttl = p.ttl.min(ttl);
            for ip in addrs {
                if !p.addrs.contains(&ip) {
                    p.addrs.push(ip);
                }
            }
            for port in &service.ports {
                let owner = srv_name(&port.name, port.protocol, &fqdn);
                let Ok(owner) = name_to_wire(&owner) else {
                    snap.warnings.push(BuildWarning::Name {
                        service: service.name.clone(),
                        source: wire::WireError::InvalidName(owner),
                    });
                    continue;
                };
                let port_no = match service.dns.mode {
                    DnsMode::Vips => port.port,
                    DnsMode::Nodes => port.target_port,
                };
                let rdata = wire::srv_rdata(SRV_PRIORITY, SRV_WEIGHT, port_no, &wire_name);
                let p = pending.entry(owner).or_insert_with(|| Pending {
                    zone: zi,
                    ttl,
                    ..Default::default()
                });
                p.ttl = p.ttl.min(ttl);
                if !p.srv.contains(&rdata) {
                    p.srv.push(rdata);
                }
            }
        }
        // Empty non-terminals: every ancestor between a name and its zone apex exists.
        let names: Vec<(Vec<u8>, usize, u32)> = pending
            .iter()
            .map(|(k, p)| (k.clone(), p.zone, p.ttl))
            .collect();
        for (name, zone, ttl) in names {
            let apex_len = snap.zones[zone].apex.len();
            let mut at = 0;
            while name.len() - at > apex_len {
                at += 1 + name[at] as usize;
                if name.len() - at <= apex_len {
                    break;
                }
                pending
                    .entry(name[at..].to_vec())
                    .or_insert_with(|| Pending {
                        zone,
                        ttl,
                        ..Default::default()
                    });
            }
        }
        for (name, p) in pending {
            let entry = prepare(&name, &p, &snap.zones[p.zone], &zone_meta[p.zone]);
            snap.names.insert(name.into_boxed_slice(), entry);
        }
        snap
    }

    /// Finds where a lower-cased question name falls.
    pub fn lookup(&self, qname: &[u8]) -> Lookup<'_> {
        if let Some(e) = self.names.get(qname) {
            return Lookup::Name(e);
        }
        // Longest enclosing apex: walk the suffixes from the longest.
        let mut at = 0;
        while at < qname.len() {
            let suffix = &qname[at..];
            if let Some(z) = self.zones.iter().find(|z| *z.apex == *suffix) {
                return Lookup::NxDomain(z, at);
            }
            at += 1 + qname[at] as usize;
        }
        Lookup::Refused
    }

    /// What each published service name answers now.
    pub fn status(&self) -> &[DnsNameStatus] {
        &self.status
    }

    /// Parts of the config this snapshot could not publish.
    pub fn warnings(&self) -> &[BuildWarning] {
        &self.warnings
    }

    /// Number of names (including apexes and empty non-terminals).
    pub fn name_count(&self) -> usize {
        self.names.len()
    }
}

/// Renders every answer of one name. Owner pointers assume the question at offset 12.
fn prepare(
    name: &[u8],
    p: &Pending,
    zone: &ZoneData,
    (soa, ns, zone_ttl): &(Vec<u8>, Vec<Vec<u8>>, u32),
) -> NameEntry {
    let here = pointer(HEADER_LEN);
    let apex_ptr = pointer(HEADER_LEN + name.len() - zone.apex.len());
    let rrset = |t: u16, ttl: u32, rdatas: &mut dyn Iterator<Item = Vec<u8>>| {
        let mut body = Vec::new();
        let mut n = 0u16;
        let mut len = None;
        let mut same = true;
        for rd in rdatas {
            put_rr(&mut body, &here, t, CLASS_IN, ttl, &rd);
            let l = here.len() + 10 + rd.len();
            same &= *len.get_or_insert(l) == l;
            n += 1;
        }
        (n > 0).then(|| Answer::new(n, 0, body, len.filter(|_| same).map(|l| (l, n as usize))))
    };
    let v4 = p.addrs.iter().filter_map(|ip| match ip {
        IpAddr::V4(a) => Some(a.octets().to_vec()),
        IpAddr::V6(_) => None,
    });
    let v6 = p.addrs.iter().filter_map(|ip| match ip {
        IpAddr::V6(a) => Some(a.octets().to_vec()),
        IpAddr::V4(_) => None,
    });
    let mut neg = Vec::new();
    neg.extend_from_slice(&apex_ptr);
    neg.extend_from_slice(&zone.negative_soa);
    let mut hinfo = Vec::new();
    put_rr(
        &mut hinfo,
        &here,
        rtype::HINFO,
        CLASS_IN,
        p.ttl,
        &wire::hinfo_rdata("RFC8482", ""),
    );
    NameEntry {
        zone: p.zone,
        a: rrset(rtype::A, p.ttl, &mut v4.into_iter()),
        aaaa: rrset(rtype::AAAA, p.ttl, &mut v6.into_iter()),
        ns: if p.apex {
            rrset(rtype::NS, *zone_ttl, &mut ns.iter().cloned())
        } else {
            None
        },
        soa: if p.apex {
            rrset(rtype::SOA, *zone_ttl, &mut std::iter::once(soa.clone()))
        } else {
            None
        },
        srv: rrset(rtype::SRV, p.ttl, &mut p.srv.iter().cloned()).map(|mut a| {
            a.rotation = None;
            a
        }),
        any: Answer::new(1, 0, hinfo, None),
        nodata: Answer::new(0, 1, neg, None),
    }
}

#[cfg(test)]
mod tests;
