//! The source host's record of a running migration, `IMAGE.tern-session`, so that a source
//! restarted after a crash resumes the session instead of copying everything again.
//!
//! The record names the session, the target and its fingerprint, and ends with a CRC-32 of
//! the lines above it. It is written (and fsync'ed, with its directory) before the migration
//! connects, and removed once the migration committed or was rolled back. A failed migration
//! keeps it: running the same migration again (same images, same target) resumes the
//! session — the engine compares its disks with the target's by digest and sends only what
//! differs (`SourceConfig::restarted`). A record that fails its checksum is ignored with a
//! warning: the migration then copies everything, never skips on a damaged record.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

const HEADER: &str = "tern-session 1";

/// Where the record of `image` lives.
pub(crate) fn record_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".tern-session");
    PathBuf::from(name)
}

fn text(session_id: &[u8; 16], target: &str, peer: &str) -> String {
    let hex: String = session_id.iter().map(|b| format!("{b:02x}")).collect();
    let body = format!("{HEADER}\nsession {hex}\ntarget {target}\npeer {peer}\n");
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}crc32 {crc:08x}\n")
}

/// Parses a record; `Err` says why it is unusable.
fn parse(record: &str) -> Result<([u8; 16], String, String), String> {
    let (body, crc_line) = record
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .ok_or("truncated")?;
    let body = format!("{body}\n");
    let crc = crc_line
        .strip_prefix("crc32 ")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or("no checksum")?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return Err("checksum mismatch".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err("unknown format".into());
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {name}"))
    };
    let hex = field("session")?;
    let target = field("target")?;
    let peer = field("peer")?;
    let mut session_id = [0u8; 16];
    if hex.len() != 32 {
        return Err("bad session id".into());
    }
    for (i, byte) in session_id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "bad session id")?;
    }
    Ok((session_id, target, peer))
}

/// The session to run for `images` → `target`: the recorded one if every image has a valid
/// record of the same session to the same target (returns `true`: a restarted source), or a
/// new one, recorded durably before this returns.
pub(crate) fn begin(
    images: &[PathBuf],
    target: &str,
    peer: &str,
) -> anyhow::Result<([u8; 16], bool)> {
    let mut recorded = Vec::new();
    for image in images {
        let path = record_path(image);
        match std::fs::read_to_string(&path) {
            Ok(record) => match parse(&record) {
                Ok(parsed) => recorded.push(Some(parsed)),
                Err(why) => {
                    tracing::warn!(record = %path.display(), why, "damaged session record: this migration copies everything");
                    recorded.push(None);
                }
            },
            Err(_) => recorded.push(None),
        }
    }
    if let Some(Some((session_id, _, _))) = recorded.first()
        && recorded.iter().all(|r| {
            r.as_ref()
                .is_some_and(|(id, t, p)| id == session_id && t == target && p == peer)
        })
    {
        let hex: String = session_id.iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!(session = %hex, "resuming the session of a previous run: only what differs on the target is sent");
        return Ok((*session_id, true));
    }
    let mut session_id = [0u8; 16];
    rand::fill(&mut session_id);
    let record = text(&session_id, target, peer);
    for image in images {
        let path = record_path(image);
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        file.write_all(record.as_bytes())?;
        file.sync_all()?;
        let dir = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok((session_id, false))
}

/// The migration committed or was abandoned on purpose: forget the session.
pub(crate) fn end(images: &[PathBuf]) {
    for image in images {
        let path = record_path(image);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(record = %path.display(), error = %e, "cannot remove the session record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_refused() {
        let id = [0xab; 16];
        let record = text(&id, "192.0.2.7:4433", "sha256:00");
        assert_eq!(
            parse(&record).unwrap(),
            (id, "192.0.2.7:4433".into(), "sha256:00".into())
        );
        let damaged = record.replace("4433", "4434");
        assert_eq!(parse(&damaged).unwrap_err(), "checksum mismatch");
        assert!(parse("").is_err());
        assert!(parse(&record[..record.len() / 2]).is_err());
    }

    #[test]
    fn begin_resumes_only_the_same_session_to_the_same_target() {
        let dir = tempfile::tempdir().unwrap();
        let images = vec![dir.path().join("a.img"), dir.path().join("b.img")];
        let (first, restarted) = begin(&images, "192.0.2.7:4433", "sha256:00").unwrap();
        assert!(!restarted);
        let (again, restarted) = begin(&images, "192.0.2.7:4433", "sha256:00").unwrap();
        assert!(restarted);
        assert_eq!(again, first);
        // Another target: a new session (and the records now name it).
        let (other, restarted) = begin(&images, "192.0.2.8:4433", "sha256:00").unwrap();
        assert!(!restarted);
        assert_ne!(other, first);
        // A damaged record: a new session, never a resume.
        std::fs::write(record_path(&images[1]), "tern-session 1\nsession 00\n").unwrap();
        let (_, restarted) = begin(&images, "192.0.2.8:4433", "sha256:00").unwrap();
        assert!(!restarted);
        end(&images);
        assert!(!record_path(&images[0]).exists());
    }
}
