//! Fuzzes the frame decoder and the control-message decoder with arbitrary bytes: they must
//! return an error, never panic, and never allocate beyond the frame limits.
//!
//! Run: `cargo +nightly fuzz run decode` (with AddressSanitizer), or on stable
//! `cargo fuzz run decode --sanitizer none`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_transport::{Control, Frame, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = decode(data) {
        assert!(used <= data.len());
        if let Frame::Control(body) = frame {
            let _ = Control::decode(&body);
        }
    }
    let _ = Control::decode(data);
});
