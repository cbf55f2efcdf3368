//! The `lazybd` command: parse arguments, set up logging, dispatch to the
//! subcommand (in `cli/`, which calls the library). anyhow lives only in the
//! binary; the library has its own error type.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::{Cli, Cmd};

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("lazybd={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let r = match cli.cmd {
        Cmd::Serve(a) => cli::serve::run(*a),
        Cmd::Cache(c) => cli::cache::run(c),
        Cmd::Export(c) => cli::export::run(c),
        Cmd::Overlay(c) => cli::overlay::run(c),
        Cmd::Profile(c) => cli::profile::run(c),
        Cmd::Copy(a) => cli::copy::run(a),
        Cmd::Manifest(c) => cli::manifest::run(c),
        Cmd::Reload { control } => cli::export::reload(control),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazybd: error: {}", chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The error chain on one line. lazybd's own errors already print their
/// sources, so a cause whose text the line already holds is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
