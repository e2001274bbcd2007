//! `--metrics ADDR`: Prometheus text exposition over plain HTTP, built from the same status
//! the control API reports (one source of truth).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::jobs::Jobs;

/// Serves `GET /metrics` (any path answers the same) until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, jobs: Arc<Jobs>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            // Read the request head (bounded); the method and path do not matter.
            let mut head = vec![0u8; 8192];
            let mut filled = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while filled < head.len() {
                    let n = stream.read(&mut head[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                    if head[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let body = render(&jobs.status());
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

const PHASES: [&str; 9] = [
    "migrating",
    "converged",
    "switching-over",
    "switched-over",
    "committing",
    "committed",
    "failed",
    "rolled-back",
    "cancelled",
];

/// The exposition text for a `query-status` value.
pub(crate) fn render(status: &Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let disks = status["disks"].as_array().cloned().unwrap_or_default();
    let migrations = status["migrations"].as_array().cloned().unwrap_or_default();
    let per_disk = |key: &str| -> Vec<(String, f64)> {
        disks
            .iter()
            .map(|d| {
                (
                    format!("{{disk=\"{}\"}}", escape(&d["name"])),
                    d[key].as_f64().unwrap_or(0.0),
                )
            })
            .collect()
    };
    family(
        "tern_disk_size_bytes",
        "gauge",
        "Size of an exported disk.",
        per_disk("size"),
    );
    family(
        "tern_disk_dirty_bytes",
        "gauge",
        "Bytes written since the last harvest.",
        per_disk("dirty-bytes"),
    );
    family(
        "tern_nbd_requests_in_flight",
        "gauge",
        "NBD requests admitted and not yet completed.",
        per_disk("in-flight"),
    );
    let per_migration = |key: &str, scale: f64| -> Vec<(String, f64)> {
        migrations
            .iter()
            .filter(|m| !m[key].is_null())
            .map(|m| {
                (
                    format!("{{migration=\"{}\"}}", escape(&m["migration"])),
                    m[key].as_f64().unwrap_or(0.0) * scale,
                )
            })
            .collect()
    };
    family(
        "tern_migration_bytes_total",
        "gauge",
        "Bytes of all disks of a migration.",
        per_migration("bytes-total", 1.0),
    );
    family(
        "tern_migration_bytes_copied",
        "counter",
        "Bytes covered by the copy so far (data and zero ranges).",
        per_migration("bytes-done", 1.0),
    );
    family(
        "tern_migration_bytes_resent",
        "counter",
        "Bytes sent again because the guest rewrote them.",
        per_migration("bytes-resent", 1.0),
    );
    family(
        "tern_migration_dirty_bytes",
        "gauge",
        "Dirty bytes at the last harvest.",
        per_migration("dirty-bytes", 1.0),
    );
    family(
        "tern_migration_transfer_rate_bytes",
        "gauge",
        "Copy rate, bytes per second.",
        per_migration("transfer-rate", 1.0),
    );
    family(
        "tern_migration_passes",
        "counter",
        "Dirty-bitmap harvests.",
        per_migration("passes", 1.0),
    );
    family(
        "tern_migration_switchover_downtime_seconds",
        "gauge",
        "Storage downtime of the switchover.",
        per_migration("downtime-ms", 1e-3),
    );
    let phases = migrations
        .iter()
        .flat_map(|m| {
            let current = m["phase"].as_str().unwrap_or_default().to_owned();
            let id = escape(&m["migration"]);
            PHASES.iter().map(move |p| {
                (
                    format!("{{migration=\"{id}\",phase=\"{p}\"}}"),
                    f64::from(u8::from(*p == current)),
                )
            })
        })
        .collect();
    family(
        "tern_migration_phase",
        "gauge",
        "1 for the phase a migration is in.",
        phases,
    );
    family(
        "tern_errors_total",
        "counter",
        "Migrations that failed.",
        vec![(
            String::new(),
            status["errors-total"].as_f64().unwrap_or(0.0),
        )],
    );
    out
}

fn escape(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_default()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_labels() {
        let status = serde_json::json!({
            "disks": [{ "name": "vda", "size": 1024, "dirty-bytes": 0, "in-flight": 2 }],
            "migrations": [{ "migration": "m1", "phase": "converged", "bytes-total": 1024,
                             "bytes-done": 512, "downtime-ms": null, "transfer-rate": 10.5 }],
            "errors-total": 1,
        });
        let text = render(&status);
        assert!(
            text.contains("tern_disk_size_bytes{disk=\"vda\"} 1024"),
            "{text}"
        );
        assert!(
            text.contains("tern_nbd_requests_in_flight{disk=\"vda\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tern_migration_bytes_copied{migration=\"m1\"} 512"),
            "{text}"
        );
        assert!(
            text.contains("tern_migration_phase{migration=\"m1\",phase=\"converged\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tern_migration_phase{migration=\"m1\",phase=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("tern_migration_switchover_downtime_seconds{"),
            "{text}"
        );
        assert!(text.contains("tern_errors_total 1"), "{text}");
    }
}
