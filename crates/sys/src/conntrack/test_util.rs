//! Test helpers shared by the conntrack tests (`conntrack.rs`'s and `events/tests.rs`):
//! hand-built ctnetlink attributes.

use super::{
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_PROTO_DST_PORT, CTA_PROTO_NUM, CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP, CTA_TUPLE_PROTO,
};
use crate::netlink::{self, NLA_F_NESTED};

/// One attribute, padded to 4 bytes.
pub(crate) fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    netlink::attr(&mut a, kind, payload);
    a
}

/// A TCP `CTA_TUPLE_*` attribute (`kind`: `CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`) of IPv4
/// `src:sport → dst:dport`.
pub(crate) fn tuple_attr(kind: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let ip = [nla(CTA_IP_V4_SRC, &src), nla(CTA_IP_V4_DST, &dst)].concat();
    let proto = [
        nla(CTA_PROTO_NUM, &[6]),
        nla(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
        nla(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
    ]
    .concat();
    nla(
        kind | NLA_F_NESTED,
        &[
            nla(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
            nla(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
        ]
        .concat(),
    )
}
