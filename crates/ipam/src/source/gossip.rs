//! The gossip keys of the agent's Secret: reading them, refusing bad ones, and saying so once.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use model::ClusterKey;

use super::GOSSIP_SECRET_KEY;

/// Gossip keys from the Secret: `key` is id 1, `key-<id>` id `<id>`; the highest id first (it
/// sends). Malformed keys and the all-zero example key of `deploy/gossip-secret.yaml` are refused
/// (see [`refused_gossip_keys`]; this function is pure and logs nothing, because it runs on every
/// rebuild).
pub fn gossip_keys(secret: Option<&Secret>) -> Vec<ClusterKey> {
    let mut keys: Vec<ClusterKey> = read_gossip_keys(secret)
        .into_iter()
        .filter_map(|(_, k)| k.ok())
        .collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.id));
    keys
}

/// The Secret's data keys that are refused, with why (`key`: "the all-zero example key …").
pub fn refused_gossip_keys(secret: Option<&Secret>) -> BTreeMap<String, &'static str> {
    read_gossip_keys(secret)
        .into_iter()
        .filter_map(|(name, k)| k.err().map(|why| (name, why)))
        .collect()
}

/// Every data key of the Secret that looks like a gossip key (`key`, `key-…`), read.
fn read_gossip_keys(secret: Option<&Secret>) -> Vec<(String, Result<ClusterKey, &'static str>)> {
    let mut keys = secret
        .and_then(|s| s.data.as_ref())
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == GOSSIP_SECRET_KEY || k.starts_with("key-"))
        .map(|(k, v)| {
            let key = (|| {
                let id = if k == GOSSIP_SECRET_KEY {
                    1
                } else {
                    k.strip_prefix("key-")
                        .and_then(|i| i.parse::<u8>().ok())
                        .ok_or("the name must be key or key-<id> with an id from 0 to 255")?
                };
                let text = std::str::from_utf8(&v.0).map_err(|_| "the value is not text")?;
                let secret = model::config::decode_secret(text.trim())
                    .ok_or("the value must be the base64 of 32 random bytes")?;
                if secret == [0; 32] {
                    return Err(
                        "the all-zero example key of deploy/gossip-secret.yaml: replace it",
                    );
                }
                Ok(ClusterKey { id, secret })
            })();
            (k.clone(), key)
        })
        .collect::<Vec<_>>();
    // `key` and `key-1` both name id 1: the first (in name order) counts.
    let mut ids = BTreeSet::new();
    for (_, k) in &mut keys {
        if let Ok(key) = k
            && !ids.insert(key.id)
        {
            *k = Err("its id is already given by another data key (key is id 1)");
        }
    }
    keys
}

/// The gossip Secret as last logged: whether it existed, its key ids, its refused keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SecretSeen {
    pub(super) present: bool,
    pub(super) ids: Vec<u8>,
    pub(super) refused: BTreeMap<String, &'static str>,
}

/// What to log when the gossip Secret went from `before` to `now` (warning?, message); nothing
/// when nothing changed, so a refused key is reported once, not on every rebuild.
pub(super) fn secret_messages(before: &SecretSeen, now: &SecretSeen) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    if before == now {
        return out;
    }
    for (key, why) in &now.refused {
        if before.refused.get(key) != Some(why) {
            out.push((
                true,
                format!("refusing gossip key {key} from the Secret: {why}"),
            ));
        }
    }
    if before.present && !now.present {
        out.push((
            true,
            "the gossip Secret was deleted: gossip falls back to the keys of --config (none by default) until it is created again".into(),
        ));
    } else if now.ids != before.ids {
        out.push((
            false,
            format!(
                "gossip keys from the Secret: ids {:?} (the first sends)",
                now.ids
            ),
        ));
    }
    out
}
