//! ARP and IPv6 neighbour-discovery frames: build the ones we send, parse the ones we answer.
//!
//! ARP over Ethernet (42 bytes, RFC 826):
//! ```text
//!  0            6            12     14     16     18   19   20     22           28     32           38     42
//! +------------+------------+------+------+------+----+----+------+------------+------+------------+------+
//! | dst MAC    | src MAC    | 0806 | 0001 | 0800 | 06 | 04 | op   | sender MAC | s IP | target MAC | t IP |
//! +------------+------------+------+------+------+----+----+------+------------+------+------------+------+
//! gratuitous: dst ff:ff:ff:ff:ff:ff, op 1 (request), s IP = t IP = VIP, target MAC 0
//! reply:      dst = asker, op 2, sender = (our MAC, VIP), target = (asker MAC, asker IP)
//! ```
//!
//! Neighbour advertisement (86 bytes, RFC 4861 §4.4):
//! ```text
//!  0         6         12    14                      54     55     56      58         62        78      79      80     86
//! +---------+---------+-----+----------------------+------+------+-------+----------+---------+-------+-------+------+
//! | dst MAC | src MAC | 86dd| IPv6 header: payload | type | code | cksum | R S O 0… | target  | opt 2 | len 1 | MAC  |
//! |         |         |     | 32, next 58, hop 255 | 136  | 0    |       | flags    | (VIP)   | TLLA  |       |      |
//! +---------+---------+-----+----------------------+------+------+-------+----------+---------+-------+-------+------+
//! unsolicited: dst 33:33:00:00:00:01 / ff02::1, flags O (0x20)
//! solicited:   dst = asker (MAC and IPv6; ff02::1 if it asked from ::), flags S|O (0x60)
//! ```
//! The IPv6 source of what we send is the VIP itself.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

/// The broadcast MAC.
pub const BROADCAST: Mac = [0xff; 6];

/// Why a frame was not understood (it is then ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not an Ethernet ARP/IPv4 frame of the expected shape.
    #[error("not an ARP frame for IPv4 over Ethernet")]
    NotArp,
    /// Not an ICMPv6 neighbour solicitation or advertisement we can read.
    #[error("not a neighbour discovery frame")]
    NotNd,
}

/// A parsed ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// Builds an ARP frame.
pub fn arp(dst: Mac, src: Mac, a: &Arp) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0, 0]);
    f[20..22].copy_from_slice(&a.op.to_be_bytes());
    f[22..28].copy_from_slice(&a.sha);
    f[28..32].copy_from_slice(&a.spa.octets());
    f[32..38].copy_from_slice(&a.tha);
    f[38..42].copy_from_slice(&a.tpa.octets());
    f
}

/// A gratuitous ARP request announcing `vip` at `mac`.
pub fn garp(mac: Mac, vip: Ipv4Addr) -> [u8; 42] {
    arp(
        BROADCAST,
        mac,
        &Arp {
            op: 1,
            sha: mac,
            spa: vip,
            tha: [0; 6],
            tpa: vip,
        },
    )
}

/// The reply to `req` saying `req.tpa` is at `mac`.
pub fn arp_reply(mac: Mac, req: &Arp) -> [u8; 42] {
    arp(
        req.sha,
        mac,
        &Arp {
            op: 2,
            sha: mac,
            spa: req.tpa,
            tha: req.sha,
            tpa: req.spa,
        },
    )
}

/// Parses an Ethernet ARP frame for IPv4.
pub fn parse_arp(f: &[u8]) -> Result<Arp, Error> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[14..20] != [0x00, 0x01, 0x08, 0x00, 6, 4] {
        return Err(Error::NotArp);
    }
    let mac = |r: std::ops::Range<usize>| -> Mac { f[r].try_into().unwrap_or([0; 6]) };
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    Ok(Arp {
        op: u16::from_be_bytes([f[20], f[21]]),
        sha: mac(22..28),
        spa: ip(28),
        tha: mac(32..38),
        tpa: ip(38),
    })
}

/// A parsed neighbour solicitation or advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nd {
    /// 135 solicitation, 136 advertisement.
    pub kind: u8,
    /// Ethernet source.
    pub src_mac: Mac,
    /// IPv6 source.
    pub src: Ipv6Addr,
    /// The target address asked about or announced.
    pub target: Ipv6Addr,
    /// Source (NS) or target (NA) link-layer address option, if present.
    pub lla: Option<Mac>,
}

fn checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds a neighbour advertisement for `target` at `mac`.
pub fn na(dst_mac: Mac, mac: Mac, dst: Ipv6Addr, target: Ipv6Addr, solicited: bool) -> [u8; 86] {
    let mut f = [0u8; 86];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&target.octets());
    f[38..54].copy_from_slice(&dst.octets());
    f[54] = 136;
    f[58] = if solicited { 0x60 } else { 0x20 };
    f[62..78].copy_from_slice(&target.octets());
    f[78] = 2;
    f[79] = 1;
    f[80..86].copy_from_slice(&mac);
    let c = checksum(&target, &dst, &f[54..86]);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f
}

/// The all-nodes multicast address and its MAC.
pub const ALL_NODES: (Mac, Ipv6Addr) = (
    [0x33, 0x33, 0, 0, 0, 1],
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
);

/// An unsolicited neighbour advertisement for `vip` at `mac` (to all nodes).
pub fn unsolicited_na(mac: Mac, vip: Ipv6Addr) -> [u8; 86] {
    na(ALL_NODES.0, mac, ALL_NODES.1, vip, false)
}

/// The solicited advertisement answering `ns`.
pub fn na_reply(mac: Mac, ns: &Nd) -> [u8; 86] {
    if ns.src.is_unspecified() {
        na(ALL_NODES.0, mac, ALL_NODES.1, ns.target, false)
    } else {
        na(ns.lla.unwrap_or(ns.src_mac), mac, ns.src, ns.target, true)
    }
}

/// A neighbour solicitation from (`mac`, `src`) for `target`, to its solicited-node multicast
/// group, with a source link-layer address option (what a host sends to resolve the VIP).
pub fn ns(mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> [u8; 86] {
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut f = na(
        [0x33, 0x33, 0xff, t[13], t[14], t[15]],
        mac,
        group,
        target,
        false,
    );
    f[22..38].copy_from_slice(&src.octets());
    f[54] = 135;
    f[56..62].copy_from_slice(&[0; 6]);
    f[78] = 1;
    let c = checksum(&src, &group, &f[54..86]);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f
}

/// Parses an Ethernet frame carrying an ICMPv6 NS or NA (no extension headers, hop limit 255,
/// valid checksum).
pub fn parse_nd(f: &[u8]) -> Result<Nd, Error> {
    if f.len() < 78 || f[12..14] != [0x86, 0xdd] || f[20] != 58 || f[21] != 255 {
        return Err(Error::NotNd);
    }
    let kind = f[54];
    if !(kind == 135 || kind == 136) || f[55] != 0 {
        return Err(Error::NotNd);
    }
    let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
    if f.len() < 54 + plen || plen < 24 {
        return Err(Error::NotNd);
    }
    let v6 = |o: usize| -> Ipv6Addr {
        <[u8; 16]>::try_from(&f[o..o + 16])
            .map(Ipv6Addr::from)
            .unwrap_or(Ipv6Addr::UNSPECIFIED)
    };
    let (src, dst) = (v6(22), v6(38));
    if checksum(&src, &dst, &f[54..54 + plen]) != 0 {
        return Err(Error::NotNd);
    }
    let mut lla = None;
    let mut o = 78;
    let want = if kind == 135 { 1 } else { 2 };
    while o + 8 <= 54 + plen {
        let (t, l) = (f[o], usize::from(f[o + 1]) * 8);
        if l == 0 {
            break;
        }
        if t == want && l >= 8 {
            lla = f[o + 2..o + 8].try_into().ok();
        }
        o += l;
    }
    Ok(Nd {
        kind,
        src_mac: f[6..12].try_into().unwrap_or([0; 6]),
        src,
        target: v6(62),
        lla,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const MAC: Mac = [0x02, 0, 0, 0, 0, 0x0a];
    const ASKER: Mac = [0x02, 0, 0, 0, 0, 0xcc];

    const GARP: &str = "ffffffffffff 02000000000a 0806 0001 0800 06 04 0001
        02000000000a 0a000064 000000000000 0a000064";
    const REQUEST: &str = "ffffffffffff 0200000000cc 0806 0001 0800 06 04 0001
        0200000000cc 0a0000fe 000000000000 0a000064";
    const REPLY: &str = "0200000000cc 02000000000a 0806 0001 0800 06 04 0002
        02000000000a 0a000064 0200000000cc 0a0000fe";

    #[test]
    fn arp_fixtures_both_ways() {
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        assert_eq!(hex(&garp(MAC, vip)), hex(&unhex(GARP)));
        let req = parse_arp(&unhex(REQUEST)).unwrap();
        assert_eq!(
            req,
            Arp {
                op: 1,
                sha: ASKER,
                spa: Ipv4Addr::new(10, 0, 0, 254),
                tha: [0; 6],
                tpa: vip
            }
        );
        assert_eq!(hex(&arp_reply(MAC, &req)), hex(&unhex(REPLY)));
        let g = parse_arp(&unhex(GARP)).unwrap();
        assert_eq!((g.op, g.sha, g.spa, g.tpa), (1, MAC, vip, vip));
        assert_eq!(parse_arp(&unhex(REPLY)).unwrap().op, 2);
        assert_eq!(parse_arp(&unhex(REPLY)[..41]), Err(Error::NotArp));
    }

    const UNSOLICITED_NA: &str = "333300000001 02000000000a 86dd 60000000 0020 3a ff
        fd000000000000000000000000000100 ff020000000000000000000000000001
        88 00 5894 20000000 fd000000000000000000000000000100 02 01 02000000000a";
    /// NS from fd00::fe (MAC …cc) for fd00::100, with a source link-layer option.
    const NS: &str = "3333ff000100 0200000000cc 86dd 60000000 0020 3a ff
        fd0000000000000000000000000000fe ff0200000000000000000001ff000100
        87 00 79d3 00000000 fd000000000000000000000000000100 01 01 0200000000cc";
    const SOLICITED_NA: &str = "0200000000cc 02000000000a 86dd 60000000 0020 3a ff
        fd000000000000000000000000000100 fd0000000000000000000000000000fe
        88 00 1999 60000000 fd000000000000000000000000000100 02 01 02000000000a";

    /// Recomputes the NS fixture's checksum (the fixtures' checksums were also checked with an
    /// independent Python implementation of RFC 4443 §2.3).
    fn ns_frame() -> Vec<u8> {
        let mut f = unhex(&NS.replace("79d3", "0000"));
        let src: Ipv6Addr = "fd00::fe".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1:ff00:100".parse().unwrap();
        let c = checksum(&src, &dst, &f[54..86]);
        f[56..58].copy_from_slice(&c.to_be_bytes());
        f
    }

    #[test]
    fn nd_fixtures_both_ways() {
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        let na = unsolicited_na(MAC, vip);
        assert_eq!(hex(&na), hex(&unhex(UNSOLICITED_NA)));
        let parsed = parse_nd(&na).unwrap();
        assert_eq!(
            (parsed.kind, parsed.target, parsed.lla),
            (136, vip, Some(MAC))
        );
        let ns = parse_nd(&unhex(NS)).unwrap();
        assert_eq!(ns, parse_nd(&ns_frame()).unwrap());
        assert_eq!(
            (ns.kind, ns.src, ns.target, ns.lla),
            (135, "fd00::fe".parse().unwrap(), vip, Some(ASKER))
        );
        assert_eq!(hex(&na_reply(MAC, &ns)), hex(&unhex(SOLICITED_NA)));
        let mut bad = na.to_vec();
        bad[70] ^= 1;
        assert_eq!(parse_nd(&bad), Err(Error::NotNd));
        assert_eq!(
            hex(&super::ns(ASKER, "fd00::fe".parse().unwrap(), vip)),
            hex(&unhex(NS))
        );
    }
}
