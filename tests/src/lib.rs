//! KMS twin and hang lab. (crate docs: see README, written below)
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod fault;
pub mod lab;
pub mod secrets;
pub mod twin;
