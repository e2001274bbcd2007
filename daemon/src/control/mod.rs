//! The control API of `tern export`: JSON lines on a Unix socket ([`server`]), the message
//! shapes ([`wire`]) and the command-line client behind `tern ctl` and `tern status`
//! ([`client`]).

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod wire;
