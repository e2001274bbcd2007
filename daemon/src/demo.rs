//! `tern demo`: a complete migration on loopback in one process, checked byte for byte.
//!
//! It makes a mixed image in a temporary directory, a key pair for each side, starts a target
//! and a source on 127.0.0.1 over QUIC with mutual TLS, copies, lets the two sides compare
//! digests, and finally compares the two files itself, independently of the engine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use tern_blockdev::OpenOptions;
use tern_engine::compression::CompressionMode;
use tern_engine::driver::{incomplete_marker, serve_one};
use tern_transport::{Identity, TransportTuning, listen};

/// Arguments of `tern demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Size of the demo image.
    #[arg(long, default_value = "1G", value_parser = crate::size::parse_size)]
    size: u64,
    /// Compression (see `tern migrate --help`).
    #[arg(long = "compress", default_value = "auto")]
    compression: CompressionMode,
    /// Verification (see `tern migrate --help`).
    #[arg(long, default_value = "written")]
    verify: tern_engine::VerifyMode,
    /// Keep the images in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DemoSummary {
    #[serde(flatten)]
    copy: crate::migrate::Summary,
    target_matches_source: bool,
    image_bytes_allocated_source: u64,
    image_bytes_allocated_target: u64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("make a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let source_image = dir.join("source.img");
    let target_image = dir.join("target.img");
    let _ = std::fs::remove_file(&target_image);
    if !args.json {
        eprintln!(
            "tern demo: writing a {:.0} MiB mixed image (random, holes, text) to {}",
            args.size as f64 / (1 << 20) as f64,
            source_image.display()
        );
    }
    crate::gen_image::generate(
        &source_image,
        args.size,
        "random=50,hole=25,text=25",
        1,
        false,
    )?;
    let source_identity = Identity::generate("tern-demo-source")?;
    let target_identity = Identity::generate("tern-demo-target")?;

    // Source and target share this process: one worker each.
    let runtime = crate::migrate::runtime(2)?;
    let summary = runtime.block_on(async {
        let endpoint = listen(
            "127.0.0.1:0".parse().expect("valid address"),
            &target_identity,
            source_identity.fingerprint(),
            &TransportTuning::default(),
        )?;
        let address = endpoint.local_addr()?;
        let images = vec![target_image.clone()];
        let target = tokio::spawn(async move {
            let report = serve_one(&endpoint, &images, &OpenOptions::default()).await;
            endpoint.close(0u32.into(), b"bye");
            report
        });
        let options = crate::migrate::options(args.compression, 4, args.verify);
        let copy = crate::migrate::copy(
            std::slice::from_ref(&source_image),
            address,
            &source_identity,
            target_identity.fingerprint(),
            options,
            args.json,
        )
        .await?;
        target.await?.context("target failed")?;
        anyhow::Ok(copy)
    })?;

    let started = Instant::now();
    let equal = files_equal(&source_image, &target_image)?;
    if incomplete_marker(&target_image).exists() {
        bail!("the target image is still marked incomplete");
    }
    let demo = DemoSummary {
        copy: summary,
        target_matches_source: equal,
        image_bytes_allocated_source: allocated(&source_image)?,
        image_bytes_allocated_target: allocated(&target_image)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&demo)?);
    } else {
        crate::migrate::print_summary(&demo.copy, false)?;
        println!(
            "independent check: target {} source byte for byte ({:.2} s); allocated {:.0} MiB on the source, {:.0} MiB on the target",
            if equal { "equals" } else { "DIFFERS FROM" },
            started.elapsed().as_secs_f64(),
            demo.image_bytes_allocated_source as f64 / (1 << 20) as f64,
            demo.image_bytes_allocated_target as f64 / (1 << 20) as f64,
        );
    }
    if !equal || !demo.copy.verified {
        bail!("the target does not equal the source");
    }
    Ok(())
}

fn allocated(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Compares two files byte for byte.
pub(crate) fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut a = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a)?);
    let mut b = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b)?);
    let mut buf_a = vec![0u8; 1 << 20];
    let mut buf_b = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut a, &mut buf_a)?;
        let m = read_full(&mut b, &mut buf_b)?;
        if n != m || buf_a[..n] != buf_b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
