//! B: an auth webhook / Ethereum RPC call hangs. The rules are the shared
//! peer rules (`peer.rs`).

use super::peer::{rules as peer_rules, Peer};
use super::Rule;
use crate::analyse::WaitsOn;

/// The rules of B, in order.
pub(crate) fn rules() -> Vec<Box<dyn Rule>> {
    peer_rules(Peer {
        letter: "B",
        peer: WaitsOn::AuthWebhook,
    })
}
