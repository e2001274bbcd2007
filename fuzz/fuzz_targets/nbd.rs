//! Fuzzes a whole NBD session: arbitrary client bytes (negotiation, then requests and write
//! payloads) go into `serve_connection` over an in-memory pipe, with a 1 MiB in-memory disk
//! behind the export. The server must answer or close, never panic, never hang past the
//! negotiation timeout, and never touch bytes outside the disk (the memory device would
//! fail such an op, and the request checks reject it first).
//!
//! Seed: `fuzz/seeds/nbd/` holds a valid fixed-newstyle GO handshake followed by a few
//! requests, so the fuzzer starts inside the transmission phase.
//! Run: `cargo fuzz run nbd --sanitizer none fuzz/seeds/nbd -- -max_total_time=600`.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_blockdev::BlockDevice;
use tern_nbd::{Export, serve_connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    runtime().block_on(async move {
        let (device, _faults) = BlockDevice::memory(1 << 20);
        let export = Export::new("disk", Arc::new(device), false);
        let (client, server) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(async move { serve_connection(server, &[export]).await });
        let (mut reader, mut writer) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while reader.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        let _ = writer.write_all(&data).await;
        let _ = writer.shutdown().await;
        // A session ends when the client's bytes run out (EOF) or on a protocol error.
        let ended = tokio::time::timeout(Duration::from_secs(40), session).await;
        assert!(ended.is_ok(), "session did not end after the client closed");
        drain.abort();
    });
});
