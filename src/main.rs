//! The `vfolderd` binary: parse the CLI, set up logging, load config, dispatch.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vfolderd::config::NodeConfig;
use vfolderd::spec::Permission;

#[derive(Parser)]
#[command(
    name = "vfolderd",
    version,
    about = "Per-node reconciler for per-user storage (vfolders)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the reconciler (the daemon).
    Run {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Put volume specs (the seed's `volumes:` list, or one spec) into etcd.
    Apply {
        /// Node config file (for the etcd endpoints and prefix).
        #[arg(long)]
        config: PathBuf,
        /// The YAML document.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// vfolder records.
    Vfolder {
        #[command(subcommand)]
        cmd: VfolderCmd,
    },
    /// Unmount everything vfolderd owns on this node (binds first); the daemon must be stopped.
    Drain {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// Drain although kernels are still desired here (or etcd is unreachable).
        #[arg(long)]
        force: bool,
    },
    /// Print every status key as a table.
    Status {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum VfolderCmd {
    /// Create a vfolder record with a fresh uuid and print the uuid.
    Create {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The volume it lives on.
        #[arg(long)]
        volume: String,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its owner.
        #[arg(long)]
        owner: String,
        /// ro or rw.
        #[arg(long, default_value = "rw", value_parser = parse_permission)]
        permission: Permission,
    },
}

fn parse_permission(s: &str) -> Result<Permission, String> {
    match s {
        "ro" => Ok(Permission::Ro),
        "rw" => Ok(Permission::Rw),
        _ => Err(format!("permission must be ro or rw, got {s:?}")),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig::load(path)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,tonic=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { config } => {
            let shutdown = shutdown_signal();
            let cfg = load(&config)?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let deps = vfolderd::Deps::linux(&cfg.mount_helper);
            vfolderd::run(cfg, deps, listener, shutdown).await?;
        }
        Cmd::Apply { config, file } => {
            for name in vfolderd::cli::apply(&load(&config)?, &file).await? {
                println!("applied volume {name}");
            }
        }
        Cmd::Vfolder {
            cmd:
                VfolderCmd::Create {
                    config,
                    volume,
                    name,
                    owner,
                    permission,
                },
        } => {
            let id =
                vfolderd::cli::vfolder_create(&load(&config)?, &volume, &name, &owner, permission)
                    .await?;
            println!("{id}");
        }
        Cmd::Drain { config, force } => {
            let report = vfolderd::cli::drain(&load(&config)?, force).await?;
            for t in &report.unmounted {
                println!("unmounted {}", t.display());
            }
            for f in &report.failed {
                eprintln!("failed: {f}");
            }
            println!(
                "drained: {} unmounted, {} failed",
                report.unmounted.len(),
                report.failed.len()
            );
            if !report.failed.is_empty() {
                anyhow::bail!("drain incomplete");
            }
        }
        Cmd::Status { config } => print!("{}", vfolderd::cli::status(&load(&config)?).await?),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when first polled: a SIGTERM that arrives while the daemon is
/// still starting must not kill it with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
