//! The BFD control packet (RFC 5880 §4.1) and its reception checks (§6.8.6).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       My Discriminator                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                      Your Discriminator                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Desired Min TX Interval                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   Required Min RX Interval                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Required Min Echo RX Interval                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Reception (§6.8.6), each a MUST: "If the version number is not correct (1), the packet
//! MUST be discarded." "If the Length field is less than the minimum correct value (24 if the A
//! bit is clear, or 26 if the A bit is set), the packet MUST be discarded." "If the Length field
//! is greater than the payload of the encapsulating protocol, the packet MUST be discarded."
//! "If the Detect Mult field is zero, the packet MUST be discarded." "If the Multipoint (M) bit
//! is nonzero, the packet MUST be discarded." "If the My Discriminator field is zero, the packet
//! MUST be discarded." "If the Your Discriminator field is zero and the State field is not Down
//! or AdminDown, the packet MUST be discarded." "If the A bit is set and no authentication is in
//! use (bfd.AuthType is zero), the packet MUST be discarded." portico uses no authentication
//! (single-hop sessions are protected by GTSM, TTL 255, RFC 5881 §5), so a packet with the A bit
//! is discarded here.

pub mod session;

/// The length of a control packet without authentication.
pub const LEN: usize = 24;

/// Session state (§4.1 "Sta").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// 0.
    AdminDown,
    /// 1.
    Down,
    /// 2.
    Init,
    /// 3.
    Up,
}

/// A control packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Diagnostic code (0–31; 1 control detection time expired, 3 neighbor signaled session
    /// down, 7 administratively down, …).
    pub diag: u8,
    /// The sender's state.
    pub state: State,
    /// Poll (P).
    pub poll: bool,
    /// Final (F).
    pub fin: bool,
    /// Control plane independent (C).
    pub cpi: bool,
    /// Demand mode (D).
    pub demand: bool,
    /// Detect time multiplier (non-zero).
    pub detect_mult: u8,
    /// The sender's discriminator (non-zero).
    pub my_disc: u32,
    /// The receiver's discriminator as the sender knows it (0 until learned).
    pub your_disc: u32,
    /// Desired minimum transmit interval, µs.
    pub desired_min_tx: u32,
    /// Required minimum receive interval, µs.
    pub required_min_rx: u32,
    /// Required minimum echo receive interval, µs (0: no echo).
    pub required_min_echo_rx: u32,
}

/// Why a received packet is discarded (§6.8.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer than 24 octets, or fewer than the Length field says.
    #[error("BFD packet truncated: {got} octets, {need} needed")]
    Truncated {
        /// Octets received.
        got: usize,
        /// Octets needed.
        need: usize,
    },
    /// Version other than 1.
    #[error("BFD version {0} (only 1)")]
    Version(u8),
    /// Length field below 24 (26 with authentication).
    #[error("BFD length field {0} too small")]
    Length(u8),
    /// Detect Mult zero.
    #[error("BFD detect multiplier 0")]
    DetectMult,
    /// Multipoint bit set.
    #[error("BFD multipoint bit set")]
    Multipoint,
    /// My Discriminator zero.
    #[error("BFD my discriminator 0")]
    MyDiscriminator,
    /// Your Discriminator zero while the sender is neither Down nor AdminDown.
    #[error("BFD your discriminator 0 in state {0:?}")]
    YourDiscriminator(State),
    /// Authentication present: not in use here.
    #[error("BFD authentication present but none is configured")]
    Authentication,
}

impl Control {
    /// Decodes and checks a received packet (`buf` is the UDP payload).
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        let Some(head) = buf.first_chunk::<LEN>() else {
            return Err(Error::Truncated {
                got: buf.len(),
                need: LEN,
            });
        };
        let version = head[0] >> 5;
        if version != 1 {
            return Err(Error::Version(version));
        }
        let flags = head[1];
        let auth = flags & 0x04 != 0;
        let length = head[3];
        let min = if auth { 26 } else { 24 };
        if usize::from(length) < min {
            return Err(Error::Length(length));
        }
        if usize::from(length) > buf.len() {
            return Err(Error::Truncated {
                got: buf.len(),
                need: usize::from(length),
            });
        }
        let detect_mult = head[2];
        if detect_mult == 0 {
            return Err(Error::DetectMult);
        }
        if flags & 0x01 != 0 {
            return Err(Error::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let state = match flags >> 6 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        };
        let my_disc = word(4);
        if my_disc == 0 {
            return Err(Error::MyDiscriminator);
        }
        let your_disc = word(8);
        if your_disc == 0 && state > State::Down {
            return Err(Error::YourDiscriminator(state));
        }
        if auth {
            return Err(Error::Authentication);
        }
        Ok(Control {
            diag: head[0] & 0x1f,
            state,
            poll: flags & 0x20 != 0,
            fin: flags & 0x10 != 0,
            cpi: flags & 0x08 != 0,
            demand: flags & 0x02 != 0,
            detect_mult,
            my_disc,
            your_disc,
            desired_min_tx: word(12),
            required_min_rx: word(16),
            required_min_echo_rx: word(20),
        })
    }

    /// Encodes the packet (24 octets, no authentication).
    pub fn encode(&self) -> [u8; LEN] {
        let mut o = [0u8; LEN];
        o[0] = (1 << 5) | (self.diag & 0x1f);
        let sta = match self.state {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        };
        o[1] = (sta << 6)
            | (u8::from(self.poll) << 5)
            | (u8::from(self.fin) << 4)
            | (u8::from(self.cpi) << 3)
            | (u8::from(self.demand) << 1);
        o[2] = self.detect_mult;
        o[3] = LEN as u8;
        for (i, w) in [
            self.my_disc,
            self.your_disc,
            self.desired_min_tx,
            self.required_min_rx,
            self.required_min_echo_rx,
        ]
        .into_iter()
        .enumerate()
        {
            o[4 + 4 * i..8 + 4 * i].copy_from_slice(&w.to_be_bytes());
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        crate::message::unhex(s)
    }

    #[test]
    fn fixture_both_ways() {
        // Up, detect mult 3, 300 ms intervals (FRR's and BIRD's defaults), discriminators 1
        // and 2, no echo.
        let wire = unhex("20c00318 00000001 00000002 000493e0 000493e0 00000000");
        let c = Control {
            diag: 0,
            state: State::Up,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 1,
            your_disc: 2,
            desired_min_tx: 300_000,
            required_min_rx: 300_000,
            required_min_echo_rx: 0,
        };
        assert_eq!(c.encode().to_vec(), wire);
        assert_eq!(Control::decode(&wire), Ok(c));
        // Down with diag 1 (detection time expired) and the poll bit, your discriminator 0.
        let wire = unhex("21600318 0000beef 00000000 000f4240 000f4240 00000000");
        let c = Control::decode(&wire).unwrap();
        assert_eq!(
            (c.state, c.diag, c.poll, c.your_disc),
            (State::Down, 1, true, 0)
        );
        assert_eq!(c.encode().to_vec(), wire);
    }

    #[test]
    fn every_must_of_reception_discards() {
        let good = Control {
            diag: 0,
            state: State::Up,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 7,
            your_disc: 9,
            desired_min_tx: 10_000,
            required_min_rx: 10_000,
            required_min_echo_rx: 0,
        }
        .encode();
        let with = |f: &dyn Fn(&mut [u8; LEN])| {
            let mut b = good;
            f(&mut b);
            Control::decode(&b)
        };
        assert_eq!(with(&|b| b[0] = 0x40), Err(Error::Version(2)));
        assert_eq!(with(&|b| b[3] = 23), Err(Error::Length(23)));
        assert_eq!(
            with(&|b| b[3] = 30),
            Err(Error::Truncated { got: 24, need: 30 })
        );
        assert_eq!(with(&|b| b[2] = 0), Err(Error::DetectMult));
        assert_eq!(with(&|b| b[1] |= 0x01), Err(Error::Multipoint));
        assert_eq!(with(&|b| b[4..8].fill(0)), Err(Error::MyDiscriminator));
        assert_eq!(
            with(&|b| b[8..12].fill(0)),
            Err(Error::YourDiscriminator(State::Up))
        );
        assert_eq!(with(&|b| b[1] |= 0x04), Err(Error::Length(24)));
        assert_eq!(
            Control::decode(
                &[good.as_slice(), &[1, 2]]
                    .concat()
                    .iter()
                    .enumerate()
                    .map(|(i, x)| if i == 1 {
                        x | 0x04
                    } else if i == 3 {
                        26
                    } else {
                        *x
                    })
                    .collect::<Vec<u8>>()
            ),
            Err(Error::Authentication)
        );
        assert_eq!(
            Control::decode(&good[..20]),
            Err(Error::Truncated { got: 20, need: 24 })
        );
    }

    proptest! {
        #[test]
        fn round_trip(diag in 0u8..32, sta in 0u8..4, p: bool, f: bool, c: bool, d: bool,
                      mult in 1u8.., my in 1u32.., your: u32, tx: u32, rx: u32, echo: u32) {
            let state = [State::AdminDown, State::Down, State::Init, State::Up][usize::from(sta)];
            let your = if state > State::Down { your.max(1) } else { your };
            let x = Control { diag, state, poll: p, fin: f, cpi: c, demand: d, detect_mult: mult,
                my_disc: my, your_disc: your, desired_min_tx: tx, required_min_rx: rx,
                required_min_echo_rx: echo };
            prop_assert_eq!(Control::decode(&x.encode()), Ok(x));
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Control::decode(&bytes);
        }
    }
}
