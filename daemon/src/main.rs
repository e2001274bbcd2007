//! `tern`: the command line and daemon of Tern, a shared-nothing live storage migration
//! engine. See `tern --help` and README.md.

#![forbid(unsafe_code)]

mod config;
mod control;
mod demo;
mod export;
mod gen_image;
mod jobs;
mod keygen;
mod metrics;
mod migrate;
mod progress;
mod qmp;
mod serve;
mod session;
mod size;
mod vm;

use clap::{Parser, Subcommand, ValueEnum};

/// Tern moves a virtual disk to another host over QUIC with mutual TLS: bulk copy with
/// zero skipping and compression, then verification of every byte.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about, long_about = None)]
struct Cli {
    /// Read settings from this TOML file (one table per subcommand, keys are long flag
    /// names); flags given on the command line win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `tern_engine=debug`); the
    /// RUST_LOG environment variable is used when this is not given.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a key and a self-signed certificate in DIR and print its fingerprint.
    Keygen(keygen::Args),
    /// Be the target: accept one migration into the image(s), then exit.
    Serve(serve::Args),
    /// Be the source: copy the image(s) to a target started with `tern serve`.
    Migrate(migrate::Args),
    /// Be the source daemon: serve disks over NBD (every write tracked) and migrate them
    /// live when the control API says so.
    Export(export::Args),
    /// Send one command to a `tern export` control socket (or wait for an event).
    Ctl(control::client::CtlArgs),
    /// Show a `tern export` daemon's disks and migrations, following the running one live.
    Status(control::client::StatusArgs),
    /// Migrate a running QEMU VM: its disks with Tern (through `tern export`), its memory
    /// with QEMU, switching both over in one pause.
    VmMigrate(vm::Args),
    /// Run a complete migration on loopback (target and source in one process) and check it.
    Demo(demo::Args),
    /// Write a test image with a seeded mix of random, zero and text-like 1 MiB extents.
    GenImage(gen_image::Args),
}

fn main() -> std::process::ExitCode {
    let argv = match config::apply(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    init_logging(cli.log_format, cli.log.as_deref(), &cli.command);
    // Keep freed heap for reuse instead of faulting it in again for every burst of data
    // (tern_blockdev::heap explains and measures it).
    if !tern_blockdev::tune_allocator() {
        tracing::debug!("malloc thresholds left at the C library's defaults");
    }
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Export(args) => export::run(args),
        Command::Ctl(args) => control::client::ctl(args),
        Command::Status(args) => control::client::status(args),
        Command::VmMigrate(args) => vm::run(args),
        Command::Demo(args) => demo::run(args),
        Command::GenImage(args) => gen_image::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, filter: Option<&str>, command: &Command) {
    use tracing_subscriber::EnvFilter;
    // The target is a long-running service: it logs what it does. The source and the demo
    // show a progress bar or a summary instead, and log only warnings unless asked.
    let default = match command {
        Command::Serve(_) | Command::Export(_) => "info",
        _ => "warn",
    };
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
