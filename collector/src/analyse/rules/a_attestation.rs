//! A: an attestation / PCCS call hangs. The guest agent's quote call
//! (`kms.peer = guest_agent`, `kms.call` naming an attestation or a quote)
//! counts as attestation too. The rules are the shared peer rules
//! (`peer.rs`).

use super::peer::{rules as peer_rules, Peer};
use super::Rule;
use crate::analyse::WaitsOn;

/// The rules of A, in order.
pub(crate) fn rules() -> Vec<Box<dyn Rule>> {
    peer_rules(Peer {
        letter: "A",
        peer: WaitsOn::Attestation,
    })
}
