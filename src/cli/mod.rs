//! Command-line interface: one subcommand per role of the binary.

mod check;
mod records;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api;

/// Kubernetes operator for DKIM keys, verified DNS records and a signing relay.
#[derive(Parser, Debug)]
#[command(name = "mailauth-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator against the current kubeconfig or in-cluster config.
    Controller(crate::controller::ControllerArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Check domains' DKIM selectors, SPF and DMARC in DNS; exits 1 when a
    /// check fails.
    Check(check::CheckArgs),
    /// Print the DNS records a MailDomain manifest needs, as zone-file lines.
    Records(records::RecordsArgs),
    /// Run the signing SMTP relay with a mounted config directory.
    Relay(crate::relay::RelayArgs),
}

/// Errors a subcommand reports to the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("rendering CRDs: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Controller(#[from] crate::controller::Error),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Check(#[from] check::CheckError),
    #[error(transparent)]
    Records(#[from] records::RecordsError),
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Crd { out_dir: None } => {
            print!("{}", api::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd { out_dir: Some(dir) } => {
            write_crds(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => Ok(check::run(args)?),
        Command::Records(args) => Ok(records::run(args)?),
        Command::Relay(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(crate::relay::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(crate::controller::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_crds(dir: &std::path::Path) -> Result<(), CliError> {
    let io = |path: PathBuf| move |source| CliError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    for crd in api::crds() {
        let path = dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::crd_yaml(&crd)?).map_err(io(path.clone()))?;
    }
    Ok(())
}
