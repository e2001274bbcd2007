//! `tern ctl` and `tern status`: the control API from a shell.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Arguments of `tern ctl`.
#[derive(clap::Args, Debug)]
pub(crate) struct CtlArgs {
    /// The daemon's control socket (`tern export --control`).
    socket: PathBuf,
    /// A command (`query-status`, `migrate`, `switchover`, `commit`, `rollback`, `cancel`,
    /// `set-bandwidth`), or `wait EVENT` to block until that event (fails on `failed`), or
    /// `events` to print every event as it comes.
    command: String,
    /// Arguments as KEY=VALUE; a VALUE that parses as JSON (numbers, true, lists) is sent as
    /// such, anything else as a string. For `wait`: the event name.
    args: Vec<String>,
    /// Give up after this many seconds (`wait` only; default: wait forever).
    #[arg(long)]
    timeout: Option<f64>,
}

/// Arguments of `tern status`.
#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// The daemon's control socket.
    socket: PathBuf,
    /// Print the status once and exit instead of following the migration live.
    #[arg(long)]
    once: bool,
    /// Print the raw `query-status` JSON.
    #[arg(long)]
    json: bool,
}

/// A blocking control-API client (also used by `tern vm-migrate`).
pub(crate) struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Events that arrived while waiting for a reply.
    pending_events: std::collections::VecDeque<Value>,
}

impl Client {
    /// Connects and checks the greeting.
    pub(crate) fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connect to the control socket {}", path.display()))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            pending_events: Default::default(),
        };
        let greeting = client
            .read_line()?
            .context("the daemon closed the connection")?;
        if greeting.get("tern").is_none() {
            bail!("not a tern control socket (greeting {greeting})");
        }
        Ok(client)
    }

    fn read_line(&mut self) -> anyhow::Result<Option<Value>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&line).with_context(|| {
            format!("bad line from daemon: {line}")
        })?))
    }

    /// Runs a command; returns its `return` value or fails with its error.
    pub(crate) fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "execute": command, "arguments": arguments, "id": id });
        writeln!(self.writer, "{request}")?;
        loop {
            let line = self
                .read_line()?
                .context("the daemon closed the connection")?;
            if line.get("event").is_some() {
                self.pending_events.push_back(line);
                continue;
            }
            if line.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(value) = line.get("return") {
                return Ok(value.clone());
            }
            let class = line["error"]["class"].as_str().unwrap_or("GenericError");
            let desc = line["error"]["desc"].as_str().unwrap_or("unknown error");
            bail!("{command}: {desc} ({class})");
        }
    }

    /// The next event (queued while waiting for replies first); `None` when closed.
    pub(crate) fn next_event(&mut self) -> anyhow::Result<Option<Value>> {
        if let Some(event) = self.pending_events.pop_front() {
            return Ok(Some(event));
        }
        loop {
            match self.read_line()? {
                None => return Ok(None),
                Some(line) if line.get("event").is_some() => return Ok(Some(line)),
                Some(_) => continue,
            }
        }
    }
}

fn parse_arguments(args: &[String]) -> anyhow::Result<Value> {
    let mut map = serde_json::Map::new();
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            bail!("argument {arg:?} is not KEY=VALUE");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        map.insert(key.to_owned(), value);
    }
    Ok(Value::Object(map))
}

pub(crate) fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let mut client = Client::connect(&args.socket)?;
    match args.command.as_str() {
        "events" => {
            while let Some(event) = client.next_event()? {
                println!("{event}");
            }
            Ok(())
        }
        "wait" => {
            let [name] = args.args.as_slice() else {
                bail!("usage: tern ctl SOCKET wait EVENT [--timeout SECONDS]");
            };
            if let Some(seconds) = args.timeout {
                client
                    .reader
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_secs_f64(seconds)))?;
            }
            // The event may have happened before this connection: ask for the state first.
            let status = client.execute("query-status", json!({}))?;
            if let Some(latest) = status["migrations"].as_array().and_then(|m| m.last()) {
                let reached = match (name.as_str(), latest["phase"].as_str().unwrap_or_default()) {
                    ("converged", "converged") => true,
                    ("switched-over", "switched-over") => true,
                    ("completed", "committed") => true,
                    ("rolled-back", "rolled-back") | ("cancelled", "cancelled") => true,
                    ("failed", "failed") => true,
                    (_, "failed") => bail!("migration failed: {}", latest["error"]),
                    _ => false,
                };
                if reached {
                    println!("{latest}");
                    return Ok(());
                }
            }
            let started = Instant::now();
            loop {
                let event = match client.next_event() {
                    Ok(Some(event)) => event,
                    Ok(None) => bail!("the daemon closed the connection before {name}"),
                    Err(e) => bail!(
                        "no {name} event within {:.1} s ({e})",
                        started.elapsed().as_secs_f64()
                    ),
                };
                let kind = event["event"].as_str().unwrap_or_default();
                if kind == name {
                    println!("{event}");
                    return Ok(());
                }
                if kind == "failed" {
                    bail!(
                        "migration failed while waiting for {name}: {}",
                        event["data"]["error"]
                    );
                }
            }
        }
        command => {
            let value = client.execute(command, parse_arguments(&args.args)?)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
    }
}

pub(crate) fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = Client::connect(&args.socket)?;
    let status = client.execute("query-status", json!({}))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print_status(&status);
    if args.once {
        return Ok(());
    }
    let Some(latest) = status["migrations"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
    else {
        return Ok(());
    };
    if !matches!(
        latest["phase"].as_str(),
        Some("migrating" | "converged" | "switching-over" | "switched-over" | "committing")
    ) {
        return Ok(());
    }
    let id = latest["migration"].clone();
    let bar = crate::progress::bar(latest["bytes-total"].as_u64().unwrap_or(0), false);
    while let Some(event) = client.next_event()? {
        if event["data"]["migration"] != id {
            continue;
        }
        let data = &event["data"];
        match event["event"].as_str().unwrap_or_default() {
            "progress" if bar.is_hidden() => println!("progress: {data}"),
            "progress" => {
                bar.set_position(data["bytes-done"].as_u64().unwrap_or(0));
                bar.set_message(format!(
                    "{} ({}) {:.0} MiB/s dirty {} MiB ETA {}",
                    data["phase"].as_str().unwrap_or("?"),
                    data["mode"].as_str().unwrap_or("?"),
                    data["transfer-rate"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    data["dirty-bytes"].as_u64().unwrap_or(0) >> 20,
                    data["eta-s"]
                        .as_f64()
                        .map_or("?".to_owned(), |s| format!("{s:.0}s")),
                ));
            }
            kind @ ("completed" | "failed" | "rolled-back" | "cancelled") => {
                bar.finish_and_clear();
                println!("{kind}: {data}");
                return Ok(());
            }
            kind if bar.is_hidden() => println!("{kind}: {data}"),
            kind => bar.println(format!("{kind}: {data}")),
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn print_status(status: &Value) {
    println!("tern {}", status["version"].as_str().unwrap_or("?"));
    for disk in status["disks"].as_array().into_iter().flatten() {
        println!(
            "disk {:<12} {:>10} MiB  nbd {:<7} in-flight {:<3} migration {}",
            disk["name"].as_str().unwrap_or("?"),
            disk["size"].as_u64().unwrap_or(0) >> 20,
            disk["access"].as_str().unwrap_or("?"),
            disk["in-flight"],
            disk["migration"].as_str().unwrap_or("-"),
        );
    }
    for m in status["migrations"].as_array().into_iter().flatten() {
        println!(
            "migration {} to {}: {} ({}), {} / {} MiB, dirty {} MiB, {:.0} MiB/s{}{}",
            m["migration"].as_str().unwrap_or("?"),
            m["target"].as_str().unwrap_or("?"),
            m["phase"].as_str().unwrap_or("?"),
            m["mode"].as_str().unwrap_or("?"),
            m["bytes-done"].as_u64().unwrap_or(0) >> 20,
            m["bytes-total"].as_u64().unwrap_or(0) >> 20,
            m["dirty-bytes"].as_u64().unwrap_or(0) >> 20,
            m["transfer-rate"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            m["downtime-ms"]
                .as_f64()
                .map_or(String::new(), |d| format!(", downtime {d:.1} ms")),
            m["error"]
                .as_str()
                .map_or(String::new(), |e| format!(", error: {e}")),
        );
    }
}

/// `tern migrate --control`: starts a migration in a `tern export` daemon and follows it;
/// with `switchover`, switches over and commits at convergence.
pub(crate) fn migrate(
    socket: &Path,
    arguments: Value,
    switchover: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    let started = client.execute("migrate", arguments)?;
    let id = started["migration"].clone();
    let mut bar = None;
    if !json_out {
        eprintln!("migration {} started", id.as_str().unwrap_or("?"));
        bar = Some(crate::progress::bar(0, false));
    }
    while let Some(event) = client.next_event()? {
        let data = &event["data"];
        if data["migration"] != id {
            continue;
        }
        match event["event"].as_str().unwrap_or_default() {
            "progress" => {
                if let Some(bar) = &bar {
                    bar.set_length(data["bytes-total"].as_u64().unwrap_or(0));
                    bar.set_position(data["bytes-done"].as_u64().unwrap_or(0));
                    bar.set_message(data["phase"].as_str().unwrap_or("").to_owned());
                }
            }
            "converged" => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                if !switchover {
                    println!(
                        "{}",
                        if json_out {
                            event.to_string()
                        } else {
                            format!("converged: {data}")
                        }
                    );
                    return Ok(());
                }
                let done =
                    client.execute("switchover", json!({ "migration": id, "commit": true }))?;
                if json_out {
                    println!("{done}");
                } else {
                    println!(
                        "committed: downtime {:.1} ms, verified {}, {} MiB on the wire, {} passes",
                        done["downtime-ms"].as_f64().unwrap_or(0.0),
                        done["verified"],
                        done["bytes-wire"].as_u64().unwrap_or(0) >> 20,
                        done["passes"],
                    );
                }
                return Ok(());
            }
            "failed" => bail!("migration failed: {}", data["error"]),
            "cancelled" | "rolled-back" => bail!("migration {}", event["event"]),
            _ => {}
        }
    }
    bail!("the daemon closed the connection")
}
