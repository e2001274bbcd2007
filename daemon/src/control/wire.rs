//! The control API's messages: JSON lines in the shape of QEMU's QMP, so that tools that
//! speak QMP-like protocols (and people who know QMP) feel at home.
//!
//! ```text
//! server → {"tern": {"version": "0.1.0", "protocol": 1}}                      greeting
//! client → {"execute": "migrate", "arguments": {...}, "id": 7}                 command
//! server → {"return": {...}, "id": 7}                                          success
//! server → {"error": {"class": "WrongState", "desc": "..."}, "id": 7}          failure
//! server → {"event": "converged", "data": {...},
//!           "timestamp": {"seconds": 1764150000, "microseconds": 12345}}       event
//! ```
//!
//! Events go to every connection as they happen, interleaved with replies; a client that
//! waits for a reply skips lines without `return`/`error`. See docs/control-api.md.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version in the greeting; bumped on incompatible changes.
pub(crate) const PROTOCOL: u32 = 1;

/// A command from a client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    pub(crate) execute: String,
    #[serde(default)]
    pub(crate) arguments: serde_json::Map<String, Value>,
    #[serde(default)]
    pub(crate) id: Option<Value>,
}

/// Error classes, as QMP names them where QMP has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum ErrorClass {
    /// Malformed JSON or a failure without a better class.
    GenericError,
    /// No such command.
    CommandNotFound,
    /// An argument is missing, unknown or malformed.
    InvalidParameter,
    /// The command does not apply now (e.g. `commit` before `switchover`).
    WrongState,
    /// The migration failed while running the command.
    MigrationFailed,
}

/// A command's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CtlError {
    pub(crate) class: ErrorClass,
    pub(crate) desc: String,
}

impl CtlError {
    pub(crate) fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }
    pub(crate) fn param(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidParameter, desc)
    }
    pub(crate) fn state(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::WrongState, desc)
    }
}

/// The reply line to a command.
pub(crate) fn reply(result: Result<Value, CtlError>, id: Option<Value>) -> String {
    let mut line = match result {
        Ok(value) => serde_json::json!({ "return": value }),
        Err(error) => serde_json::json!({
            "error": { "class": error.class, "desc": error.desc }
        }),
    };
    if let Some(id) = id {
        line["id"] = id;
    }
    line.to_string()
}

/// An event line with the current wall-clock time.
pub(crate) fn event(name: &str, data: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    serde_json::json!({
        "event": name,
        "data": data,
        "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() },
    })
    .to_string()
}

/// The greeting line.
pub(crate) fn greeting() -> String {
    serde_json::json!({
        "tern": { "version": env!("CARGO_PKG_VERSION"), "protocol": PROTOCOL }
    })
    .to_string()
}

/// Typed access to a command's arguments, with errors that name the argument.
pub(crate) struct Args<'a> {
    map: &'a serde_json::Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Checks that every argument is one of `known`.
    pub(crate) fn new(
        map: &'a serde_json::Map<String, Value>,
        known: &[&str],
    ) -> Result<Self, CtlError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(CtlError::param(format!(
                "unknown argument {unknown:?} (this command takes: {})",
                if known.is_empty() {
                    "nothing".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(Self { map })
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, CtlError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(CtlError::param(format!(
                "{key} must be a string, not {other}"
            ))),
        }
    }

    pub(crate) fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, CtlError>
    where
        T::Err: std::fmt::Display,
    {
        let text = match self.map.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(other) => {
                return Err(CtlError::param(format!("{key}: unexpected value {other}")));
            }
        };
        text.parse()
            .map(Some)
            .map_err(|e| CtlError::param(format!("{key}: {e}")))
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Option<Vec<String>>, CtlError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(CtlError::param(format!("{key}: {other} is not a string"))),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(other) => Err(CtlError::param(format!(
                "{key} must be a list of strings, not {other}"
            ))),
        }
    }
}
