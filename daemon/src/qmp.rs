//! A small blocking QMP client: enough to drive QEMU's migration from `tern vm-migrate`.
//!
//! QMP is JSON lines on a Unix socket: a greeting, `qmp_capabilities`, then commands answered
//! by `return` or `error`, with asynchronous events in between. Events that arrive while a
//! command waits for its reply are queued for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// One QMP connection.
pub(crate) struct Qmp {
    name: &'static str,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and leaves capabilities negotiation mode.
    pub(crate) fn connect(name: &'static str, path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connect to the {name} QMP socket {}", path.display()))?;
        let mut qmp = Self {
            name,
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            events: VecDeque::new(),
        };
        let greeting = qmp.read(None)?;
        if greeting.get("QMP").is_none() {
            bail!("{name}: not a QMP socket (greeting {greeting})");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Option<Instant>) -> anyhow::Result<Value> {
        let timeout = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        self.reader.get_ref().set_read_timeout(timeout)?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("{}: QEMU closed the QMP connection", self.name),
            Ok(_) => serde_json::from_str(&line)
                .with_context(|| format!("{}: bad QMP line {line}", self.name)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{}: timed out", self.name)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a command and returns its `return` value.
    pub(crate) fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let request = if arguments.as_object().is_some_and(|m| m.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        writeln!(self.writer, "{request}")?;
        loop {
            let line = self.read(Some(Instant::now() + Duration::from_secs(30)))?;
            if line.get("event").is_some() {
                self.events.push_back(line);
            } else if let Some(value) = line.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = line.get("error") {
                bail!(
                    "{}: {command}: {}",
                    self.name,
                    error["desc"].as_str().unwrap_or("error")
                );
            }
        }
    }

    /// Waits up to `timeout` for an event that `want` accepts; returns it.
    pub(crate) fn wait_event(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let event = match self.events.pop_front() {
                Some(event) => event,
                None => self.read(Some(deadline))?,
            };
            if event.get("event").is_some() && want(&event) {
                return Ok(event);
            }
        }
    }
}
