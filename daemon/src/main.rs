//! `tern`: the command line and daemon of Tern, a shared-nothing live storage migration
//! engine. See `tern --help` and README.md.

mod demo;
mod gen_image;
mod keygen;
mod migrate;
mod progress;
mod serve;
mod size;

use clap::{Parser, Subcommand, ValueEnum};

/// Tern moves a virtual disk to another host over QUIC with mutual TLS: bulk copy with
/// zero skipping and compression, then verification of every byte.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about, long_about = None)]
struct Cli {
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
    /// Run a complete migration on loopback (target and source in one process) and check it.
    Demo(demo::Args),
    /// Write a test image with a seeded mix of random, zero and text-like 1 MiB extents.
    GenImage(gen_image::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log.as_deref(), &cli.command);
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Migrate(args) => migrate::run(args),
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
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
