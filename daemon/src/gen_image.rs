//! `tern gen-image`: seeded test images for the demo, the tests and the benchmark harness.
//!
//! The image is a sequence of 1 MiB extents (the last one may be shorter), each independently
//! random bytes, a hole (never written, so it reads as zeros and stays sparse), written
//! zeros, or text-like log lines, in proportions given by `--mix`. The same size, mix and seed
//! always give the same bytes.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const EXTENT_BYTES: u64 = 1 << 20;

/// Arguments of `tern gen-image`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Output file (created or truncated).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Size, e.g. `1G`, `512M`, `1048577`.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub(crate) size: u64,
    /// Percentages of extent kinds, `random=50,hole=25,text=25` by default; kinds are
    /// `random`, `hole`, `zero` (written zeros) and `text`. They must add up to 100.
    #[arg(long, default_value = "random=50,hole=25,text=25")]
    pub(crate) mix: String,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// fdatasync the image before exiting.
    #[arg(long)]
    pub(crate) sync: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Random,
    Hole,
    Zero,
    Text,
}

fn parse_mix(mix: &str) -> anyhow::Result<Vec<(Kind, u32)>> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.is_empty()) {
        let (name, percent) = part
            .split_once('=')
            .with_context(|| format!("mix entry {part:?} is not kind=percent"))?;
        let kind = match name.trim() {
            "random" => Kind::Random,
            "hole" => Kind::Hole,
            "zero" => Kind::Zero,
            "text" => Kind::Text,
            other => bail!("unknown extent kind {other:?} (random, hole, zero, text)"),
        };
        let percent: u32 = percent
            .trim()
            .parse()
            .with_context(|| format!("percent in {part:?}"))?;
        out.push((kind, percent));
    }
    let total: u32 = out.iter().map(|(_, p)| p).sum();
    if total != 100 {
        bail!("mix percentages add up to {total}, not 100");
    }
    Ok(out)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    generate(&args.out, args.size, &args.mix, args.seed, args.sync)
}

/// Writes the image described by the arguments.
pub(crate) fn generate(
    out: &Path,
    size: u64,
    mix: &str,
    seed: u64,
    sync: bool,
) -> anyhow::Result<()> {
    let mix = parse_mix(mix)?;
    let file = File::create(out).with_context(|| format!("create {}", out.display()))?;
    file.set_len(size).context("set image size")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; EXTENT_BYTES as usize];
    let mut offset = 0;
    while offset < size {
        let len = EXTENT_BYTES.min(size - offset) as usize;
        let roll = rng.random_range(0..100);
        let mut acc = 0;
        let kind = mix
            .iter()
            .find(|(_, p)| {
                acc += p;
                roll < acc
            })
            .map(|(k, _)| *k)
            .expect("percentages add up to 100");
        let data = &mut buf[..len];
        match kind {
            Kind::Hole => {}
            Kind::Zero => data.fill(0),
            Kind::Random => rng.fill_bytes(data),
            Kind::Text => fill_text(&mut rng, data),
        }
        if kind != Kind::Hole {
            file.write_all_at(data, offset)
                .with_context(|| format!("write {} at {offset}", out.display()))?;
        }
        offset += len as u64;
    }
    if sync {
        file.sync_data().context("fdatasync image")?;
    }
    Ok(())
}

/// Log-like lines: timestamps, hosts, levels and numbers, as a guest's /var/log holds.
fn fill_text(rng: &mut StdRng, data: &mut [u8]) {
    const HOSTS: [&str; 4] = ["web01", "db02", "cache03", "batch04"];
    const LEVELS: [&str; 4] = ["INFO", "WARN", "DEBUG", "ERROR"];
    const MESSAGES: [&str; 6] = [
        "request served path=/api/v1/items status=200",
        "connection reset by peer, retrying",
        "checkpoint complete: wrote buffers",
        "slow query detected on table orders",
        "cache miss for key user:session",
        "scheduled job finished successfully",
    ];
    let mut cursor = std::io::Cursor::new(data);
    let mut line = 0u64;
    loop {
        line += 1;
        let written = writeln!(
            cursor,
            "2026-11-26T07:{:02}:{:02}.{:03}Z {} {} [{}] {} id={} latency_ms={}",
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..1000),
            HOSTS[rng.random_range(0..HOSTS.len())],
            LEVELS[rng.random_range(0..LEVELS.len())],
            line,
            MESSAGES[rng.random_range(0..MESSAGES.len())],
            rng.random_range(0..1_000_000u32),
            rng.random_range(0..5000u32),
        );
        if written.is_err() {
            break;
        }
    }
    // The last line was cut where the extent ends; the rest of the buffer keeps what an
    // earlier extent left there, which is fine: it is still deterministic text.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_the_same_image_and_mix_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        generate(&a, (3 << 20) + 5, "random=40,hole=20,text=40", 7, false).unwrap();
        generate(&b, (3 << 20) + 5, "random=40,hole=20,text=40", 7, false).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(std::fs::metadata(&a).unwrap().len(), (3 << 20) + 5);
        assert!(parse_mix("random=50").is_err());
        assert!(parse_mix("foo=100").is_err());
    }
}
