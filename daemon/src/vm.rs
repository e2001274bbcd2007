//! `tern vm-migrate`: a whole QEMU VM — memory through QEMU, disks through Tern — in one
//! downtime budget.
//!
//! ```text
//! storage: migrate ──▶ converged (predicted final sync ≤ its share of the budget)
//! memory:  dst migrate-incoming; src caps pause-before-switchover; src migrate
//!          … RAM pre-copy (storage keeps syncing, stays converged) …
//!          src event MIGRATION pre-switchover  (vCPUs stopped, source disks drained+flushed)
//! storage: switchover + commit (final sync of every write the export accepted, target
//!          flush, verify, target export opens)
//! memory:  src migrate-continue ──▶ completed; dst runs on the target's disk
//! ```
//!
//! Any failure before the storage commit cancels both: `migrate_cancel` on the source QEMU
//! (the VM runs on), the storage migration rolled back (the source disk stays
//! authoritative). After the commit the destination is the only way forward; a failure of
//! QEMU's last step is reported as such.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::control::client::Client;
use crate::qmp::Qmp;

/// Arguments of `tern vm-migrate`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The source QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long)]
    source_qmp: PathBuf,
    /// The destination QEMU's QMP socket; it must run with `-incoming defer` and its disks
    /// on the target's NBD export (`tern serve --export-nbd`).
    #[arg(long)]
    dest_qmp: PathBuf,
    /// The source `tern export` control socket (the source QEMU's disks are its exports).
    #[arg(long)]
    control: PathBuf,
    /// The target `tern serve --listen` address.
    #[arg(long)]
    to: SocketAddr,
    /// The target's certificate fingerprint.
    #[arg(long)]
    peer: String,
    /// Identity directory for the storage migration (default: the daemon's).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// QEMU's memory migration channel, given to `migrate-incoming` and `migrate`.
    #[arg(long, default_value = "tcp:127.0.0.1:4444")]
    memory_uri: String,
    /// The VM's downtime budget in ms (QEMU's `downtime-limit`); includes the storage share.
    #[arg(long, default_value_t = 300)]
    max_downtime_ms: u64,
    /// The storage share of the budget in ms: storage must predict a final sync within it
    /// before memory migration starts.
    #[arg(long, default_value_t = 20)]
    storage_downtime_ms: u64,
    /// QEMU's memory migration bandwidth, bytes per second.
    #[arg(long, default_value_t = 1 << 30)]
    memory_bandwidth: u64,
    /// How long storage may take to converge, in seconds.
    #[arg(long, default_value_t = 600)]
    converge_timeout: u64,
    /// Run this shell command after storage converged, just before memory migration starts
    /// (to snapshot, notify, or inject a fault in tests).
    #[arg(long, value_name = "CMD")]
    exec_before_memory: Option<String>,
    /// Print one JSON line with the figures instead of a human summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut src = Qmp::connect("source QEMU", &args.source_qmp)?;
    let mut dst = Qmp::connect("destination QEMU", &args.dest_qmp)?;
    let mut storage = Client::connect(&args.control)?;
    let status = dst.execute("query-status", json!({}))?;
    if status["status"] != "inmigrate" {
        bail!(
            "the destination QEMU is {}, not waiting for a migration (start it with -incoming defer)",
            status["status"]
        );
    }

    // 1. Storage, until converged within its share of the budget.
    let mut arguments = json!({
        "target": args.to.to_string(),
        "peer": args.peer,
        "max-downtime-ms": args.storage_downtime_ms,
    });
    if let Some(identity) = &args.identity {
        arguments["identity"] = identity.display().to_string().into();
    }
    let id = storage.execute("migrate", arguments)?["migration"].clone();
    let converged = wait_storage(
        &mut storage,
        &id,
        Duration::from_secs(args.converge_timeout),
    )
    .context("storage did not converge; nothing changed on the VM")?;
    let storage_converged_s = started.elapsed().as_secs_f64();
    let abort = |storage: &mut Client, src: &mut Qmp, why: anyhow::Error| -> anyhow::Error {
        let _ = src.execute("migrate_cancel", json!({}));
        let _ = storage.execute("cancel", json!({ "migration": id.clone() }));
        why.context("VM migration cancelled: the VM runs on at the source, on its source disk")
    };

    // 2. Memory: destination first, then the source with pause-before-switchover.
    let memory = (|| -> anyhow::Result<()> {
        let events = json!({ "capabilities": [{ "capability": "events", "state": true }] });
        dst.execute("migrate-set-capabilities", events)?;
        dst.execute("migrate-incoming", json!({ "uri": args.memory_uri }))?;
        src.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "pause-before-switchover", "state": true },
                { "capability": "events", "state": true },
            ] }),
        )?;
        src.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": args.memory_bandwidth, "downtime-limit": args.max_downtime_ms }),
        )?;
        if let Some(command) = &args.exec_before_memory {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .status()?;
            if !status.success() {
                bail!("--exec-before-memory failed: {status}");
            }
        }
        src.execute("migrate", json!({ "uri": args.memory_uri }))?;
        let event = src.wait_event(Duration::from_secs(600), |e| {
            e["event"] == "MIGRATION"
                && matches!(
                    e["data"]["status"].as_str(),
                    Some("pre-switchover" | "failed" | "cancelled")
                )
        })?;
        if event["data"]["status"] != "pre-switchover" {
            bail!("QEMU's memory migration {}", event["data"]["status"]);
        }
        Ok(())
    })();
    if let Err(e) = memory {
        return Err(abort(&mut storage, &mut src, e));
    }
    let paused = Instant::now();

    // 3. The VM is paused and its disks drained: storage switchover and commit.
    let before = storage.execute("query-status", json!({}))?;
    let predicted_ms = before["migrations"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["migration"] == id))
        .and_then(|m| m["predicted-final-sync-ms"].as_f64());
    let committed = match storage.execute(
        "switchover",
        json!({ "migration": id.clone(), "commit": true }),
    ) {
        Ok(report) => report,
        Err(e) => return Err(abort(&mut storage, &mut src, e)),
    };
    let storage_share = paused.elapsed();

    // 4. Resume on the destination.
    src.execute("migrate-continue", json!({ "state": "pre-switchover" }))
        .context(
            "storage committed but QEMU refused to continue: the VM must resume on the destination",
        )?;
    let done = src.wait_event(Duration::from_secs(120), |e| {
        e["event"] == "MIGRATION"
            && matches!(e["data"]["status"].as_str(), Some("completed" | "failed"))
    })?;
    if done["data"]["status"] != "completed" {
        bail!(
            "storage committed but QEMU's migration failed after migrate-continue: start the destination VM by hand (`cont`)"
        );
    }
    let info = src.execute("query-migrate", json!({}))?;
    // The destination starts running a few ms after the source reports `completed`.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dst_status = loop {
        let status = dst.execute("query-status", json!({}))?;
        if status["status"] == "running" || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let figures = json!({
        "vm-downtime-ms": info["downtime"],
        "storage-share-ms": storage_share.as_secs_f64() * 1e3,
        "storage-switchover-ms": committed["downtime-ms"],
        "storage-predicted-final-sync-ms": predicted_ms,
        "storage-converged-s": storage_converged_s,
        "storage-converged-predicted-ms": converged["predicted-final-sync-ms"],
        "memory-total-ms": info["total-time"],
        "ram-transferred-bytes": info["ram"]["transferred"],
        "storage-bytes-wire": committed["bytes-wire"],
        "storage-bytes-resent": committed["bytes-resent"],
        "verified": committed["verified"],
        "total-s": started.elapsed().as_secs_f64(),
        "destination": dst_status["status"],
    });
    if args.json {
        println!("{figures}");
    } else {
        println!(
            "migrated: VM downtime {} ms (storage share {:.1} ms), total {:.2} s, {} MiB of RAM, {} MiB of disk on the wire, verified {}; destination {}",
            figures["vm-downtime-ms"],
            storage_share.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64(),
            info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
            committed["bytes-wire"].as_u64().unwrap_or(0) >> 20,
            committed["verified"],
            dst_status["status"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

/// Waits until the storage migration `id` converged; returns the event's data.
fn wait_storage(storage: &mut Client, id: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    let status = storage.execute("query-status", json!({}))?;
    if let Some(m) = status["migrations"]
        .as_array()
        .and_then(|m| m.iter().find(|m| &m["migration"] == id))
        .filter(|m| m["phase"] == "converged")
    {
        return Ok(m.clone());
    }
    while Instant::now() < deadline {
        let Some(event) = storage.next_event()? else {
            bail!("the storage daemon closed the control connection");
        };
        if &event["data"]["migration"] != id {
            continue;
        }
        match event["event"].as_str() {
            Some("converged") => return Ok(event["data"].clone()),
            Some("failed") => bail!("storage migration failed: {}", event["data"]["error"]),
            _ => {}
        }
    }
    bail!("storage did not converge within {} s", timeout.as_secs())
}
