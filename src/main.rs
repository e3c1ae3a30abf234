//! The `mailauth-operator` binary: a thin shell over the library.

use std::process::ExitCode;

use clap::Parser;
use mailauth_operator::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match mailauth_operator::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
