//! Tern's NBD server: how VMs (`-drive file=nbd:...`), `qemu-io`, `qemu-img` and
//! `fio --ioengine=nbd` reach a disk that Tern tracks or has just received.
//!
//! - [`proto`]: the wire format as pure functions (fuzzable, property-tested).
//! - [`export`]: a named disk and the gate that holds or refuses its IO at switchover.
//! - [`server`]: listeners (TCP, Unix) and the per-connection negotiation and transmission.
//!
//! Supported: fixed newstyle negotiation; `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`,
//! `ABORT`, `STRUCTURED_REPLY` (`STARTTLS` is refused by policy, other options are
//! `NBD_REP_ERR_UNSUP`); block size constraints (1 / 4096 / 32 MiB); `READ` (sparse
//! structured replies: zero 4 KiB runs travel as hole chunks unless `DF`), `WRITE` with `FUA`,
//! `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`; several concurrent connections (`CAN_MULTI_CONN`:
//! all connections share one file, so a flush on any covers writes completed on all).

#![forbid(unsafe_code)]

pub mod export;
pub mod proto;
pub mod server;

pub use export::{Access, Backend, Export, Pass, Refusal};
pub use server::{ConnectionError, NbdAddr, NbdServer, serve_connection};
