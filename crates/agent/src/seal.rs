//! The gossip envelope: every UDP packet authenticated and encrypted with the cluster key.
//!
//! ```text
//!  0        1        2                                   26
//! +--------+--------+-----------------------------------+----------------------------------+
//! | ver=1  | key id | nonce: 24 random bytes            | XChaCha20-Poly1305(plaintext)    |
//! +--------+--------+-----------------------------------+   ‖ 16-byte tag                  |
//!                                                       +----------------------------------+
//! associated data = bytes 0..2 (version and key id)
//!
//! plaintext:
//!  0      1          2            2+n            10+n            18+n
//! +------+----------+------------+--------------+---------------+------------------+
//! | kind | name len | name (n B) | epoch u64 BE | counter u64 BE| body             |
//! +------+----------+------------+--------------+---------------+------------------+
//! kind: 1 = SWIM (foca's postcard bytes), 2 = heartbeat (see `wire`)
//! ```
//!
//! * **Keys.** The first configured key seals; every configured key opens (rotation: add the
//!   new key second everywhere, then first, then drop the old one). A packet whose key id is
//!   unknown or whose tag does not verify is dropped and counted.
//! * **Nonces** are random 24-byte XChaCha nonces, so nodes sharing a key never collide
//!   without coordinating counters.
//! * **Replay.** Inside the ciphertext each sender puts its *epoch* (its start time in
//!   microseconds since the Unix epoch) and a per-packet counter. A receiver keeps, per sender
//!   name, the newest epoch and a 64-packet sliding window of counters, as IPsec does: older
//!   epochs, repeated counters and counters left of the window are rejected. A restarted
//!   sender has a larger epoch and is accepted at once.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use model::ClusterKey;

/// Version byte of the envelope.
pub const VERSION: u8 = 1;
/// Bytes before the ciphertext.
pub const HEADER: usize = 26;
/// Bytes the envelope adds beyond name and body (header, epoch, counter, tag, kind, length).
pub const OVERHEAD: usize = HEADER + 16 + 2 + 16;
/// Width of the replay window.
const WINDOW: u64 = 64;

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than header plus tag, or malformed inside.
    #[error("malformed packet")]
    Malformed,
    /// Unknown envelope version.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// No configured key has this id.
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    /// The tag did not verify (tampered, or sealed with another secret).
    #[error("authentication failed")]
    Auth,
    /// Seen before, or older than the sender's newest epoch or window.
    #[error("replayed packet")]
    Replay,
    /// No key configured to seal with.
    #[error("no cluster key configured")]
    NoKey,
}

/// What a packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// foca's SWIM bytes.
    Swim,
    /// A direct heartbeat.
    Heartbeat,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Swim => 1,
            Kind::Heartbeat => 2,
        }
    }
}

/// An opened packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// What it carries.
    pub kind: Kind,
    /// The sender's node name.
    pub sender: String,
    /// The sender's epoch.
    pub epoch: u64,
    /// The body.
    pub body: Vec<u8>,
}

/// Seals packets for one sender.
pub struct Sealer {
    key: Option<(u8, XChaCha20Poly1305)>,
    me: String,
    epoch: u64,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({}, epoch {})", self.me, self.epoch)
    }
}

impl Sealer {
    /// A sealer for node `me` with start time `epoch`; the first key seals.
    pub fn new(keys: &[ClusterKey], me: &str, epoch: u64) -> Self {
        Self {
            key: keys
                .first()
                .map(|k| (k.id, XChaCha20Poly1305::new((&k.secret).into()))),
            me: me.to_string(),
            epoch,
            counter: 0,
        }
    }

    /// Replaces the keys (a reload, a rotated Secret) and keeps the epoch and the counter:
    /// peers keep their replay windows for this sender, so a counter that started again at 0
    /// would be rejected as replayed until it passed the old one.
    pub fn set_keys(&mut self, keys: &[ClusterKey]) {
        self.key = keys
            .first()
            .map(|k| (k.id, XChaCha20Poly1305::new((&k.secret).into())));
    }

    /// This sender's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Seals `body` with a random nonce.
    pub fn seal(&mut self, kind: Kind, body: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; 24];
        rand::RngExt::fill(&mut rand::rng(), &mut nonce[..]);
        self.seal_with_nonce(kind, body, nonce)
    }

    /// Seals `body` with the given nonce (tests and fixtures only need this directly).
    pub fn seal_with_nonce(
        &mut self,
        kind: Kind,
        body: &[u8],
        nonce: [u8; 24],
    ) -> Result<Vec<u8>, Error> {
        let (id, aead) = self.key.as_ref().ok_or(Error::NoKey)?;
        self.counter += 1;
        let name = self.me.as_bytes();
        let name = &name[..name.len().min(255)];
        let mut plain = Vec::with_capacity(18 + name.len() + body.len());
        plain.push(kind.byte());
        plain.push(name.len() as u8);
        plain.extend_from_slice(name);
        plain.extend_from_slice(&self.epoch.to_be_bytes());
        plain.extend_from_slice(&self.counter.to_be_bytes());
        plain.extend_from_slice(body);
        let aad = [VERSION, *id];
        let ct = aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Auth)?;
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    epoch: u64,
    top: u64,
    seen: u64,
}

impl Window {
    /// Accepts `(epoch, counter)` once, moving the window forward.
    fn accept(&mut self, epoch: u64, counter: u64) -> bool {
        if epoch < self.epoch {
            return false;
        }
        if epoch > self.epoch {
            *self = Window {
                epoch,
                top: counter,
                seen: 1,
            };
            return true;
        }
        if counter > self.top {
            let shift = counter - self.top;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = counter;
            true
        } else {
            let back = self.top - counter;
            if back >= WINDOW || self.seen & (1 << back) != 0 {
                false
            } else {
                self.seen |= 1 << back;
                true
            }
        }
    }
}

/// Opens packets from every sender, remembering what it has seen.
pub struct Opener {
    keys: BTreeMap<u8, XChaCha20Poly1305>,
    windows: BTreeMap<String, Window>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Opener({} keys, {} senders)",
            self.keys.len(),
            self.windows.len()
        )
    }
}

impl Opener {
    /// An opener accepting every configured key.
    pub fn new(keys: &[ClusterKey]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| (k.id, XChaCha20Poly1305::new((&k.secret).into())))
                .collect(),
            windows: BTreeMap::new(),
        }
    }

    /// Replaces the accepted keys (a reload, a rotated Secret) and keeps every sender's replay
    /// window: a rebuilt opener would accept one captured packet per sender again.
    pub fn set_keys(&mut self, keys: &[ClusterKey]) {
        self.keys = keys
            .iter()
            .map(|k| (k.id, XChaCha20Poly1305::new((&k.secret).into())))
            .collect();
    }

    /// Authenticates, decrypts and replay-checks a packet.
    pub fn open(&mut self, packet: &[u8]) -> Result<Opened, Error> {
        if packet.len() < HEADER + 16 {
            return Err(Error::Malformed);
        }
        if packet[0] != VERSION {
            return Err(Error::Version(packet[0]));
        }
        let aead = self
            .keys
            .get(&packet[1])
            .ok_or(Error::UnknownKey(packet[1]))?;
        let plain = aead
            .decrypt(
                XNonce::from_slice(&packet[2..HEADER]),
                Payload {
                    msg: &packet[HEADER..],
                    aad: &packet[..2],
                },
            )
            .map_err(|_| Error::Auth)?;
        let kind = match plain.first() {
            Some(1) => Kind::Swim,
            Some(2) => Kind::Heartbeat,
            _ => return Err(Error::Malformed),
        };
        let n = usize::from(*plain.get(1).ok_or(Error::Malformed)?);
        if plain.len() < 18 + n {
            return Err(Error::Malformed);
        }
        let sender = std::str::from_utf8(&plain[2..2 + n])
            .map_err(|_| Error::Malformed)?
            .to_string();
        let epoch = u64::from_be_bytes(
            plain[2 + n..10 + n]
                .try_into()
                .map_err(|_| Error::Malformed)?,
        );
        let counter = u64::from_be_bytes(
            plain[10 + n..18 + n]
                .try_into()
                .map_err(|_| Error::Malformed)?,
        );
        let accepted = match self.windows.get_mut(&sender) {
            Some(w) => w.accept(epoch, counter),
            None => {
                self.windows.insert(
                    sender.clone(),
                    Window {
                        epoch,
                        top: counter,
                        seen: 1,
                    },
                );
                true
            }
        };
        if !accepted {
            return Err(Error::Replay);
        }
        Ok(Opened {
            kind,
            sender,
            epoch,
            body: plain[18 + n..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8, b: u8) -> ClusterKey {
        ClusterKey {
            id,
            secret: [b; 32],
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `node-a`, epoch 1, key 7 (all bytes 0x42), nonce 00..17, heartbeat body `hi`.
    const FIXTURE: &str = "0107 000102030405060708090a0b0c0d0e0f1011121314151617
        8efaea88a3c4eaa1f266a4460238febfd1d90bba83af4aacc02967781d3041b261c21330b71cdfd5ea95";

    #[test]
    fn fixture_both_ways() {
        let mut s = Sealer::new(&[key(7, 0x42)], "node-a", 1);
        let nonce: [u8; 24] = std::array::from_fn(|i| i as u8);
        let sealed = s.seal_with_nonce(Kind::Heartbeat, b"hi", nonce).unwrap();
        assert_eq!(hex(&sealed), hex(&unhex(FIXTURE)));
        let mut o = Opener::new(&[key(7, 0x42)]);
        let opened = o.open(&unhex(FIXTURE)).unwrap();
        assert_eq!(
            opened,
            Opened {
                kind: Kind::Heartbeat,
                sender: "node-a".into(),
                epoch: 1,
                body: b"hi".to_vec()
            }
        );
        assert_eq!(sealed.len(), OVERHEAD + "node-a".len() + 2);
    }

    #[test]
    fn tampered_packets_are_rejected() {
        let mut s = Sealer::new(&[key(1, 9)], "node-a", 10);
        let p = s.seal(Kind::Swim, b"payload").unwrap();
        for i in 0..p.len() {
            let mut t = p.clone();
            t[i] ^= 0x01;
            let mut o = Opener::new(&[key(1, 9)]);
            let e = o.open(&t).unwrap_err();
            assert!(
                matches!(e, Error::Auth | Error::Version(_) | Error::UnknownKey(_)),
                "byte {i}: {e:?}"
            );
        }
        let mut o = Opener::new(&[key(1, 9)]);
        assert_eq!(o.open(&p[..p.len() - 1]).unwrap_err(), Error::Auth);
        assert_eq!(o.open(&p[..20]).unwrap_err(), Error::Malformed);
        assert!(o.open(&p).is_ok());
    }

    #[test]
    fn wrong_key_is_rejected_and_rotation_accepts_old_and_new() {
        let mut old = Sealer::new(&[key(1, 1)], "node-a", 1);
        let mut new = Sealer::new(&[key(2, 2), key(1, 1)], "node-b", 1);
        let mut stranger = Sealer::new(&[key(1, 3)], "mallory", 1);
        let mut o = Opener::new(&[key(2, 2), key(1, 1)]);
        assert!(o.open(&old.seal(Kind::Heartbeat, b"x").unwrap()).is_ok());
        assert!(o.open(&new.seal(Kind::Heartbeat, b"x").unwrap()).is_ok());
        assert_eq!(
            o.open(&stranger.seal(Kind::Heartbeat, b"x").unwrap())
                .unwrap_err(),
            Error::Auth
        );
        let mut only_new = Opener::new(&[key(2, 2)]);
        assert_eq!(
            only_new
                .open(&old.seal(Kind::Heartbeat, b"x").unwrap())
                .unwrap_err(),
            Error::UnknownKey(1)
        );
        assert_eq!(
            Sealer::new(&[], "x", 1).seal(Kind::Swim, b"").unwrap_err(),
            Error::NoKey
        );
    }

    #[test]
    fn replayed_packets_are_rejected() {
        let mut s = Sealer::new(&[key(1, 1)], "node-a", 100);
        let mut o = Opener::new(&[key(1, 1)]);
        let packets: Vec<_> = (0..100)
            .map(|_| s.seal(Kind::Heartbeat, b"x").unwrap())
            .collect();
        assert!(o.open(&packets[0]).is_ok());
        assert_eq!(o.open(&packets[0]).unwrap_err(), Error::Replay);
        // reordering inside the window is fine, once
        assert!(o.open(&packets[5]).is_ok());
        assert!(o.open(&packets[3]).is_ok());
        assert_eq!(o.open(&packets[3]).unwrap_err(), Error::Replay);
        assert!(o.open(&packets[99]).is_ok());
        // left of the window
        assert_eq!(o.open(&packets[10]).unwrap_err(), Error::Replay);
        // a restarted sender (newer epoch) is accepted, then its old epoch is not
        let mut restarted = Sealer::new(&[key(1, 1)], "node-a", 200);
        assert!(
            o.open(&restarted.seal(Kind::Heartbeat, b"x").unwrap())
                .is_ok()
        );
        assert_eq!(o.open(&packets[98]).unwrap_err(), Error::Replay);
    }

    #[test]
    fn new_keys_keep_the_replay_window_and_the_counter() {
        let mut s = Sealer::new(&[key(1, 1)], "node-a", 100);
        let mut o = Opener::new(&[key(1, 1)]);
        let captured = s.seal(Kind::Heartbeat, b"x").unwrap();
        for _ in 0..200 {
            assert!(o.open(&s.seal(Kind::Heartbeat, b"x").unwrap()).is_ok());
        }
        // a reload (or a rotated Secret) adds a key on both sides
        o.set_keys(&[key(2, 2), key(1, 1)]);
        s.set_keys(&[key(2, 2), key(1, 1)]);
        // the captured heartbeat is still a replay: the window survived the new keys
        assert_eq!(o.open(&captured).unwrap_err(), Error::Replay);
        // and the sender's counter went on, so its next packet is not taken for one
        assert!(o.open(&s.seal(Kind::Heartbeat, b"x").unwrap()).is_ok());
        // the old key is removed: packets sealed with it no longer open
        o.set_keys(&[key(2, 2)]);
        let mut old = Sealer::new(&[key(1, 1)], "node-b", 100);
        assert_eq!(
            o.open(&old.seal(Kind::Heartbeat, b"x").unwrap())
                .unwrap_err(),
            Error::UnknownKey(1)
        );
    }
}
