//! The embedding API over real files and real QUIC on loopback: a two-disk migration with
//! guests writing commits both disks; a rollback after switchover and an abort mid-bulk leave
//! the source intact and usable and the target marked incomplete.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use tern_blockdev::{BlockDevice, IoBuf, OpenOptions};
use tern_engine::driver::{incomplete_marker, serve_one};
use tern_engine::{Migration, MigrationConfig, MigrationError, TrackedDisk};
use tern_transport::{Identity, TransportTuning, listen};

struct Target {
    address: SocketAddr,
    thread: std::thread::JoinHandle<Result<(), MigrationError>>,
}

fn start_target(paths: Vec<PathBuf>, identity: &Identity, peer: &Identity) -> Target {
    let (tx, rx) = std::sync::mpsc::channel();
    let (identity, peer) = (identity.clone(), peer.fingerprint());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let endpoint = listen(
                "127.0.0.1:0".parse().unwrap(),
                &identity,
                peer,
                &TransportTuning::default(),
            )
            .unwrap();
            tx.send(endpoint.local_addr().unwrap()).unwrap();
            let result = serve_one(&endpoint, &paths, &OpenOptions::default()).await;
            endpoint.close(0u32.into(), b"bye");
            result.map(|_| ())
        })
    });
    Target {
        address: rx.recv().unwrap(),
        thread,
    }
}

fn make_disk(path: &Path, size: usize, seed: u64) -> TrackedDisk {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data[..size / 2]);
    std::fs::write(path, data).unwrap();
    let device = BlockDevice::open(path, &OpenOptions::default()).unwrap();
    TrackedDisk::new(device, 64 << 10).unwrap()
}

/// A guest writing random blocks through `disk` until stopped.
fn guest(disk: TrackedDisk, running: Arc<AtomicBool>, seed: u64) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let blocks = disk.size() / 4096;
        let mut writes = 0;
        while running.load(Ordering::Acquire) {
            let len = rng.random_range(1..=16u64);
            let offset = rng.random_range(0..blocks - len) * 4096;
            let mut data = vec![0u8; (len * 4096) as usize];
            rng.fill_bytes(&mut data);
            disk.write_blocking(offset, IoBuf::from_slice(&data))
                .unwrap();
            writes += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        writes
    })
}

#[test]
fn two_disks_with_writing_guests_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let (source_id, target_id) = (
        Identity::generate("s").unwrap(),
        Identity::generate("t").unwrap(),
    );
    let sources = [dir.path().join("a.img"), dir.path().join("b.img")];
    let targets = vec![dir.path().join("a.dst"), dir.path().join("b.dst")];
    let disks = vec![
        make_disk(&sources[0], 24 << 20, 1),
        make_disk(&sources[1], (16 << 20) + 4096, 2),
    ];
    let target = start_target(targets.clone(), &target_id, &source_id);
    let running = Arc::new(AtomicBool::new(true));
    let guests: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| guest(d.clone(), running.clone(), i as u64))
        .collect();
    let config = MigrationConfig::new(target.address, source_id, target_id.fingerprint());
    let migration = Migration::start(disks, config).unwrap();
    let converged = migration.wait_converged(Duration::from_secs(120)).unwrap();
    assert!(converged.is_some(), "no convergence decision within 120 s");
    running.store(false, Ordering::Release);
    let writes: u64 = guests.into_iter().map(|g| g.join().unwrap()).sum();
    assert!(writes > 0);
    let handoff = migration.switchover().unwrap();
    let report = handoff.commit().unwrap();
    assert!(report.summary.verified);
    target.thread.join().unwrap().unwrap();
    for (source, target) in sources.iter().zip(&targets) {
        assert!(std::fs::read(source).unwrap() == std::fs::read(target).unwrap());
        assert!(!incomplete_marker(target).exists());
    }
}

#[test]
fn a_rollback_after_switchover_leaves_the_source_authoritative_and_the_target_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let (source_id, target_id) = (
        Identity::generate("s").unwrap(),
        Identity::generate("t").unwrap(),
    );
    let source = dir.path().join("a.img");
    let target_path = dir.path().join("a.dst");
    let disk = make_disk(&source, 16 << 20, 3);
    let target = start_target(vec![target_path.clone()], &target_id, &source_id);
    let config = MigrationConfig::new(target.address, source_id, target_id.fingerprint());
    let migration = Migration::start(vec![disk.clone()], config).unwrap();
    migration.wait_converged(Duration::from_secs(120)).unwrap();
    // The async switchover (the daemon's), from inside a runtime.
    let handoff = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(migration.switchover_async())
        .unwrap();
    assert!(handoff.verified);
    handoff.rollback().unwrap();
    assert!(
        target.thread.join().unwrap().is_err(),
        "the target must not complete"
    );
    assert!(incomplete_marker(&target_path).exists());
    // The source is still usable: the guest resumes on it.
    disk.write_blocking(0, IoBuf::from_slice(&[9u8; 4096]))
        .unwrap();
    assert_eq!(&disk.read_blocking(0, 4096).unwrap()[..], &[9u8; 4096][..]);
}

#[test]
fn an_abort_mid_bulk_leaves_the_source_intact_and_usable() {
    let dir = tempfile::tempdir().unwrap();
    let (source_id, target_id) = (
        Identity::generate("s").unwrap(),
        Identity::generate("t").unwrap(),
    );
    let source = dir.path().join("a.img");
    let target_path = dir.path().join("a.dst");
    let disk = make_disk(&source, 64 << 20, 4);
    let before = std::fs::read(&source).unwrap();
    let target = start_target(vec![target_path.clone()], &target_id, &source_id);
    let config = MigrationConfig::new(target.address, source_id, target_id.fingerprint());
    let migration = Migration::start(vec![disk.clone()], config).unwrap();
    // Abort as soon as the target accepted the handshake: the bulk pass is starting.
    let first = migration.events().recv().unwrap();
    assert_eq!(first, tern_engine::SourceEvent::Connected);
    drop(migration);
    assert!(target.thread.join().unwrap().is_err());
    assert!(incomplete_marker(&target_path).exists());
    assert!(
        std::fs::read(&source).unwrap() == before,
        "the copy changed the source"
    );
    disk.write_blocking(4096, IoBuf::from_slice(&[1u8; 4096]))
        .unwrap();
}
