//! Plays a VMM embedding Tern: guest-writer threads do IO through `TrackedDisk`, storage is
//! migrated live, a stand-in memory pre-copy starts at convergence, then the VM pauses,
//! storage switches over, and the VMM commits.
//!
//! Run: `cargo run --release -p tern-engine --example embed`. The target runs in this process
//! too (on its own thread), to keep the example self-contained; in production it is
//! `tern serve` on another host.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use tern_blockdev::{BlockDevice, IoBuf, OpenOptions};
use tern_engine::driver::serve_one;
use tern_engine::{Migration, MigrationConfig, TrackedDisk};
use tern_transport::{Identity, TransportTuning, listen};

const DISK_BYTES: u64 = 256 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let source_path = dir.path().join("vm-disk.img");
    let target_path = dir.path().join("vm-disk.migrated.img");
    // A disk with some data on it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut image = vec![0u8; DISK_BYTES as usize];
    rng.fill_bytes(&mut image[..DISK_BYTES as usize / 2]);
    std::fs::write(&source_path, &image)?;
    drop(image);

    // The target host (in production: `tern serve`).
    let source_id = Identity::generate("vmm-host-a")?;
    let target_id = Identity::generate("vmm-host-b")?;
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let target = {
        let (target_id, peer, path) = (
            target_id.clone(),
            source_id.fingerprint(),
            target_path.clone(),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let endpoint = listen(
                    "127.0.0.1:0".parse()?,
                    &target_id,
                    peer,
                    &TransportTuning::default(),
                )?;
                address_tx.send(endpoint.local_addr()?)?;
                serve_one(&endpoint, &[path], &OpenOptions::default()).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
    };
    let target_address = address_rx.recv()?;

    // The VMM's block backend: every guest write goes through the tracked disk.
    let device = BlockDevice::open(&source_path, &OpenOptions::default())?;
    let disk = TrackedDisk::new(device, 64 << 10).expect("64 KiB granularity");
    let running = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicU64::new(0));
    let guests: Vec<_> = (0..2u64)
        .map(|vcpu| {
            let (disk, running, written) = (disk.clone(), running.clone(), written.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(vcpu);
                while running.load(Ordering::Acquire) {
                    let len = rng.random_range(1..=16u64) * 4096;
                    let offset = rng.random_range(0..(DISK_BYTES - len) / 4096) * 4096;
                    let mut data = vec![0u8; len as usize];
                    rng.fill_bytes(&mut data);
                    disk.write_blocking(offset, IoBuf::from_slice(&data))
                        .expect("guest write");
                    written.fetch_add(len, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2)); // ~16 MiB/s per vCPU
                }
            })
        })
        .collect();

    // Migrate storage while the guest runs.
    let started = Instant::now();
    let config = MigrationConfig::new(target_address, source_id, target_id.fingerprint());
    let migration = Migration::start(vec![disk.clone()], config)?;
    let converged = migration.wait_converged(Duration::from_secs(120))?;
    println!(
        "storage: {converged:?} after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Memory pre-copy would run now; storage keeps sending what the guest dirties meanwhile.
    std::thread::sleep(Duration::from_millis(300));

    // Pause the vCPUs and drain their IO (the threads finish their last write).
    running.store(false, Ordering::Release);
    for guest in guests {
        guest.join().expect("guest thread");
    }
    let handoff = migration.switchover()?;
    println!(
        "storage downtime {:.1} ms",
        handoff.downtime.as_secs_f64() * 1e3
    );
    // The VMM finishes its memory migration, then commits; the VM resumes on the target.
    let report = handoff.commit()?;
    target
        .join()
        .expect("target thread")
        .map_err(|e| e.to_string())?;
    println!(
        "committed: {} passes, {:.1} MiB re-sent, guest wrote {:.1} MiB during the migration, verified {}",
        report.summary.progress.passes,
        report.summary.progress.bytes_resent as f64 / (1 << 20) as f64,
        written.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        report.summary.verified
    );
    let equal = std::fs::read(&source_path)? == std::fs::read(&target_path)?;
    println!("target equals source byte for byte: {equal}");
    assert!(equal);
    Ok(())
}
