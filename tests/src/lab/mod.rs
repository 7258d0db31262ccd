//! The hang lab: runs the collector, the twin and the GetMeta poller
//! together, injects a fault, and waits for the verdict.

pub mod cases;
pub mod child;
pub mod client;
pub mod expect;
pub mod jaeger;
pub mod load;
pub mod matrix;
pub mod progress;
pub mod scenario;
