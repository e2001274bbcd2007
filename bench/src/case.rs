//! A live case: what the disk holds, how the guest writes, the link, and which systems
//! migrate it. `tern-bench nbd` builds one from its options; `tern-bench suite` reads many
//! from a TOML file (`bench/suite.toml` is the standard suite).

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::link::LinkSpec;

/// One live case.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Case {
    /// A short name, used in file names (letters, digits, `-`).
    pub(crate) name: String,
    /// Image size, as `tern gen-image --size` takes it (e.g. `2G`).
    #[serde(default = "default_size")]
    pub(crate) size: String,
    /// Content of the image, as `tern gen-image --mix` takes it.
    #[serde(default = "default_mix")]
    pub(crate) mix: String,
    /// Repetitions; each runs every system once on a fresh image (seed = repetition).
    #[serde(default = "default_reps")]
    pub(crate) reps: u32,
    /// The guest.
    #[serde(default)]
    pub(crate) writer: Writer,
    /// The link between source and target.
    #[serde(default = "default_link")]
    pub(crate) link: LinkSpec,
    /// Tern's `migrate mode=` (`auto`, `background`, `active`).
    #[serde(default = "default_mode")]
    pub(crate) mode: String,
    /// Tern's `migrate max-downtime-ms=`.
    #[serde(default = "default_max_downtime_ms")]
    pub(crate) max_downtime_ms: u64,
    /// Page cache use of both sources (`tern export --cache`; QEMU cache.direct).
    #[serde(default = "default_cache")]
    pub(crate) cache: String,
    /// Page cache use of QEMU's target (`none`: cache.direct=on, like `tern serve`).
    #[serde(default = "default_target_cache")]
    pub(crate) qemu_target_cache: String,
    /// The systems, run in this order in every repetition (A B A B …).
    pub(crate) systems: Vec<System>,
}

fn default_size() -> String {
    "2G".to_owned()
}
fn default_mix() -> String {
    crate::copy::MIX.to_owned()
}
fn default_reps() -> u32 {
    5
}
fn default_link() -> LinkSpec {
    LinkSpec::Loopback
}
fn default_mode() -> String {
    "auto".to_owned()
}
fn default_max_downtime_ms() -> u64 {
    50
}
fn default_cache() -> String {
    "writeback".to_owned()
}
fn default_target_cache() -> String {
    "none".to_owned()
}

impl Case {
    /// Checks what serde cannot: names, counts and choices.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("case name {:?}: use letters, digits and '-'", self.name);
        }
        if self.reps == 0 {
            bail!("case {}: reps must be at least 1", self.name);
        }
        if self.systems.is_empty() {
            bail!("case {}: no systems", self.name);
        }
        if !["auto", "background", "active"].contains(&self.mode.as_str()) {
            bail!("case {}: mode {:?}", self.name, self.mode);
        }
        for (what, value) in [
            ("cache", &self.cache),
            ("qemu-target-cache", &self.qemu_target_cache),
        ] {
            if !["none", "writeback"].contains(&value.as_str()) {
                bail!("case {}: {what} {value:?} (none or writeback)", self.name);
            }
        }
        match self.writer {
            Writer::Paced { rate_mib_s, .. } if rate_mib_s.is_nan() || rate_mib_s <= 0.0 => {
                bail!("case {}: the writer's rate must be above 0", self.name)
            }
            Writer::Paced { queue_depth: 0, .. } | Writer::Unpaced { queue_depth: 0 } => {
                bail!("case {}: queue depth 0", self.name)
            }
            _ => Ok(()),
        }
    }

    /// The guest's intended rate in MiB/s (`None`: idle or unpaced).
    pub(crate) fn intended(&self) -> Option<f64> {
        match self.writer {
            Writer::Paced { rate_mib_s, .. } => Some(rate_mib_s),
            _ => None,
        }
    }
}

/// The guest: fio writing random 4–64 KiB blocks through the source's NBD export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Writer {
    /// No guest writes (an idle VM).
    #[default]
    None,
    /// Paced to a rate (fio `--rate`).
    #[serde(rename_all = "kebab-case")]
    Paced {
        /// MiB/s.
        rate_mib_s: f64,
        /// fio `--iodepth`.
        queue_depth: u32,
    },
    /// As fast as the export accepts.
    #[serde(rename_all = "kebab-case")]
    Unpaced {
        /// fio `--iodepth`.
        queue_depth: u32,
    },
}

impl Writer {
    /// A description for reports.
    pub(crate) fn describe(&self) -> String {
        match self {
            Writer::None => "no guest writes".to_owned(),
            Writer::Paced {
                rate_mib_s,
                queue_depth,
            } => format!("fio {rate_mib_s} MiB/s QD{queue_depth}"),
            Writer::Unpaced { queue_depth } => format!("fio unpaced QD{queue_depth}"),
        }
    }
}

/// A system that migrates the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) enum System {
    /// `tern export` → `tern serve` (QUIC, TLS 1.3 always).
    Tern {
        /// `migrate congestion=bbr` instead of the default CUBIC.
        bbr: bool,
    },
    /// `qemu-storage-daemon` `blockdev-mirror` to a second one over NBD.
    Qemu {
        /// `copy-mode`: write-blocking (true) or background.
        write_blocking: bool,
        /// NBD with TLS (x509 credentials on both daemons).
        tls: bool,
    },
}

impl System {
    /// Tern with its defaults.
    pub(crate) const TERN: System = System::Tern { bbr: false };

    /// Whether this is Tern (in any variant).
    pub(crate) fn is_tern(self) -> bool {
        matches!(self, System::Tern { .. })
    }

    /// The `copy-mode` of a QEMU system.
    pub(crate) fn copy_mode(self) -> Option<&'static str> {
        match self {
            System::Tern { .. } => None,
            System::Qemu {
                write_blocking: false,
                ..
            } => Some("background"),
            System::Qemu {
                write_blocking: true,
                ..
            } => Some("write-blocking"),
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            System::Tern { bbr } => write!(f, "tern{}", if *bbr { "-bbr" } else { "" }),
            System::Qemu { tls, .. } => write!(
                f,
                "qemu-{}{}",
                self.copy_mode().unwrap_or_default(),
                if *tls { "-tls" } else { "" }
            ),
        }
    }
}

impl FromStr for System {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (rest, tls) = match text.strip_suffix("-tls") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        match (rest, tls) {
            ("tern", false) => Ok(System::TERN),
            ("tern-bbr", false) => Ok(System::Tern { bbr: true }),
            ("qemu-background", tls) => Ok(System::Qemu {
                write_blocking: false,
                tls,
            }),
            ("qemu-write-blocking", tls) => Ok(System::Qemu {
                write_blocking: true,
                tls,
            }),
            _ => Err(anyhow::anyhow!(
                "system {text:?}: expected tern, qemu-background, qemu-write-blocking, or a \
                 QEMU one with -tls"
            )),
        }
    }
}

impl TryFrom<String> for System {
    type Error = anyhow::Error;

    fn try_from(text: String) -> anyhow::Result<Self> {
        text.parse()
    }
}

impl From<System> for String {
    fn from(system: System) -> Self {
        system.to_string()
    }
}

/// A suite file: shared defaults and the cases.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct SuiteFile {
    /// The cases, in run order.
    #[serde(rename = "case")]
    pub(crate) cases: Vec<Case>,
}

impl SuiteFile {
    /// Parses and validates a suite file's text.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let suite: SuiteFile = toml::from_str(text).context("parse the suite file")?;
        if suite.cases.is_empty() {
            bail!("the suite has no [[case]]");
        }
        let mut names = std::collections::HashSet::new();
        for case in &suite.cases {
            case.validate()?;
            if !names.insert(case.name.as_str()) {
                bail!("two cases are named {:?}", case.name);
            }
        }
        Ok(suite)
    }
}

#[cfg(test)]
mod tests {
    use super::{SuiteFile, System, Writer};
    use crate::link::LinkSpec;

    #[test]
    fn systems_parse_and_print_the_same() {
        for text in [
            "tern",
            "tern-bbr",
            "qemu-background",
            "qemu-write-blocking",
            "qemu-background-tls",
            "qemu-write-blocking-tls",
        ] {
            let system: System = text.parse().unwrap();
            assert_eq!(system.to_string(), text);
        }
        for bad in [
            "",
            "tern-tls",
            "qemu",
            "qemu-active",
            "qemu-background-tls-tls",
        ] {
            assert!(bad.parse::<System>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn suite_files_parse_with_defaults_and_refuse_mistakes() {
        let suite = SuiteFile::parse(
            r#"
            [[case]]
            name = "idle"
            systems = ["tern", "qemu-background-tls"]

            [[case]]
            name = "wan"
            size = "256M"
            reps = 3
            writer = { kind = "paced", rate-mib-s = 32, queue-depth = 1 }
            link = "wan:100:80:0.001"
            systems = ["tern"]
            "#,
        )
        .unwrap();
        let [idle, wan] = &suite.cases[..] else {
            panic!("two cases expected");
        };
        assert_eq!(idle.size, "2G");
        assert_eq!(idle.reps, 5);
        assert_eq!(idle.writer, Writer::None);
        assert_eq!(idle.link, LinkSpec::Loopback);
        assert_eq!(
            idle.systems,
            vec![
                System::TERN,
                System::Qemu {
                    write_blocking: false,
                    tls: true
                }
            ]
        );
        assert_eq!(wan.intended(), Some(32.0));
        assert_eq!(
            wan.link,
            LinkSpec::Wan {
                rate_mbit: 100.0,
                rtt_ms: 80.0,
                loss: 0.001
            }
        );
        for bad in [
            "",
            "[[case]]\nname = \"a\"\nsystems = []\n",
            "[[case]]\nname = \"a b\"\nsystems = [\"tern\"]\n",
            "[[case]]\nname = \"a\"\nsystems = [\"tern\"]\nreps = 0\n",
            "[[case]]\nname = \"a\"\nsystems = [\"tern\"]\ncolour = 1\n",
            "[[case]]\nname = \"a\"\nsystems = [\"tern\"]\n[[case]]\nname = \"a\"\nsystems = [\"tern\"]\n",
            "[[case]]\nname = \"a\"\nsystems = [\"tern\"]\nwriter = { kind = \"paced\", rate-mib-s = 0, queue-depth = 1 }\n",
            "[[case]]\nname = \"a\"\nsystems = [\"tern\"]\nlink = \"tbf:0\"\n",
        ] {
            assert!(SuiteFile::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_standard_suite_parses() {
        let text = include_str!("../suite.toml");
        let suite = SuiteFile::parse(text).unwrap();
        assert!(suite.cases.iter().any(|c| c.writer == Writer::None));
    }
}
