//! Library side of the benchmark harness: pieces the end-to-end fault tests share with it.

pub mod netem;
