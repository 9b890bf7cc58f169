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
    /// Log lines as text, or as one JSON object each (for a log shipper).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// What to log: a level (`info`, `debug`) or a filter
    /// (`info,vfolderd::state=debug`); overrides RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: time, level, target, message, fields, spans.
    Json,
}

/// Logs to stderr as `format` says, filtered by `level` (else RUST_LOG,
/// else info).
fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|_| EnvFilter::new("info")),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,h2=warn,tonic=warn".into())
        }
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the reconciler (the daemon).
    ///
    /// Example: vfolderd run --config /etc/vfolderd/node.yaml
    Run {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Put volume specs (the seed's `volumes:` list, or one spec) into etcd.
    ///
    /// Example: vfolderd apply --config /etc/vfolderd/node.yaml -f volumes.yaml
    Apply {
        /// Node config file (for the etcd endpoints and prefix).
        #[arg(long)]
        config: PathBuf,
        /// The YAML document.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// vfolder records: create, list, trash, restore, clone, delete.
    ///
    /// Example: vfolderd vfolder list --config /etc/vfolderd/node.yaml
    Vfolder {
        #[command(subcommand)]
        cmd: VfolderCmd,
    },
    /// Unmount everything vfolderd owns on this node (binds first); the daemon must be stopped.
    ///
    /// Example: vfolderd drain --config /etc/vfolderd/node.yaml  (after systemctl stop vfolderd)
    Drain {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// Drain although kernels are still desired here (or etcd is unreachable).
        #[arg(long)]
        force: bool,
    },
    /// Blob datasets: create a container, upload, list, mint a SAS URL.
    ///
    /// Example: vfolderd dataset ls --config /etc/vfolderd/node.yaml imagenet
    Dataset {
        #[command(subcommand)]
        cmd: DatasetCmd,
    },
    /// Accept etcd as it is now after the safety brake held this node (etcd
    /// wiped, replaced or restored): the node takes etcd's cluster id and
    /// revision, and its desired state is authoritative again. Works while
    /// the daemon runs (it rechecks every second).
    ///
    /// Example: vfolderd accept-reset --config /etc/vfolderd/node.yaml
    AcceptReset {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print every status key as a table.
    ///
    /// Example: vfolderd status --config /etc/vfolderd/node.yaml
    Status {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// List kernels, volumes or vfolders: record and status, as etcd has them.
    ///
    /// Reads etcd only (the daemon may run or not). Kernels and volume
    /// statuses are this node's unless --node or --all-nodes says otherwise.
    /// Secrets in records are shown as ***.
    ///
    /// Example: vfolderd get kernels --config /etc/vfolderd/node.yaml -o wide
    Get {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// What to list.
        #[arg(value_enum)]
        kind: vfolderd::inspect::Kind,
        /// Another node's kernels and volume statuses.
        #[arg(long, conflicts_with = "all_nodes")]
        node: Option<String>,
        /// Every node's.
        #[arg(long)]
        all_nodes: bool,
        /// table, wide, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: vfolderd::inspect::Output,
        /// After the list, print a row for each object that changes (json:
        /// one object per line), until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// What this node would do now, in order, and why.
    ///
    /// Each action with the object it serves and its reason, and the
    /// objects waiting out a backoff.
    ///
    /// Asks the running daemon over its listen address; with the daemon
    /// stopped, plans here from etcd (or the stored desired state when
    /// etcd is unreachable). Acts on nothing. Shows no option values.
    ///
    /// Example: vfolderd plan --config /etc/vfolderd/node.yaml --kernel k1
    Plan {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// Only what serves this kernel.
        #[arg(long, conflicts_with = "volume")]
        kernel: Option<String>,
        /// Only what serves this volume.
        #[arg(long)]
        volume: Option<String>,
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: vfolderd::inspect::Output,
    },
    /// Why a kernel, volume or vfolder is not Ready or Mounted, and what this
    /// node would do for it now.
    ///
    /// Shows its record (secrets as ***), its status, the chain of reasons
    /// through what it depends on (vfolder records and statuses, volumes,
    /// policy verdicts, the node's liveness), and its planned actions and
    /// backoff (from the daemon, or planned here while it is stopped).
    ///
    /// Example: vfolderd explain kernel k1 --config /etc/vfolderd/node.yaml
    Explain {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// kernel, volume or vfolder.
        #[arg(value_enum)]
        kind: vfolderd::inspect::Kind,
        /// Its id or name.
        name: String,
        /// The node whose kernel (or volume status) it is; this node by default.
        #[arg(long)]
        node: Option<String>,
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: vfolderd::inspect::Output,
    },
    /// Show one kernel, volume or vfolder: what `explain` says, and its
    /// recent events.
    ///
    /// Events are read from P/events/<node>/<kind>/<name>/ (this node's, or
    /// --node's).
    ///
    /// Example: vfolderd describe kernel k1 --config /etc/vfolderd/node.yaml
    Describe {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// kernel, volume or vfolder.
        #[arg(value_enum)]
        kind: vfolderd::inspect::Kind,
        /// Its id or name.
        name: String,
        /// The node whose kernel (or volume status) it is; this node by default.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum DatasetCmd {
    /// Create the volume's container if it is missing.
    ///
    /// Example: vfolderd dataset create-container --config /etc/vfolderd/node.yaml imagenet
    CreateContainer {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// An azureblob volume.
        volume: String,
    },
    /// Upload a file or a directory tree (content type from the extension).
    ///
    /// Example: vfolderd dataset push --config /etc/vfolderd/node.yaml imagenet ./train/
    Push {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// An azureblob volume.
        volume: String,
        /// File or directory.
        path: PathBuf,
        /// Uploads in flight at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// List the container's blobs.
    ///
    /// Example: vfolderd dataset ls --config /etc/vfolderd/node.yaml imagenet
    Ls {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// An azureblob volume.
        volume: String,
    },
    /// Print a container SAS URL (read+list, or read/write with --write).
    ///
    /// Example: vfolderd dataset sas --config /etc/vfolderd/node.yaml imagenet --hours 2
    Sas {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// An azureblob volume.
        volume: String,
        /// Read and list (the default).
        #[arg(long, conflicts_with = "write")]
        read: bool,
        /// Read, add, create, write, delete, list.
        #[arg(long)]
        write: bool,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 1.0)]
        hours: f64,
    },
}

#[derive(Subcommand)]
enum VfolderCmd {
    /// Create a vfolder record with a fresh uuid and print the uuid.
    ///
    /// Example: vfolderd vfolder create --config /etc/vfolderd/node.yaml --name work --owner alice
    Create {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The volume it lives on; without it, the `at: requested` volume a
        /// storage node reports Mounted with the most free space.
        #[arg(long)]
        volume: Option<String>,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its owner.
        #[arg(long)]
        owner: String,
        /// ro or rw.
        #[arg(long, default_value = "rw", value_parser = parse_permission)]
        permission: Permission,
        /// Its quota in bytes (the status says OverQuota past it).
        #[arg(long)]
        quota_bytes: Option<u64>,
    },
    /// Every vfolder: record and status.
    ///
    /// Example: vfolderd vfolder list --config /etc/vfolderd/node.yaml
    List {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Put a vfolder in the trash (`trash: true`): moved aside once no
    /// kernel wants it, never purged by this alone.
    /// Example: `vfolderd vfolder trash --config /etc/vfolderd/node.yaml 0123abcd-...`
    Trash {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The vfolder.
        id: uuid::Uuid,
    },
    /// Take a vfolder out of the trash (its record drops `trash`).
    ///
    /// Example: vfolderd vfolder restore --config /etc/vfolderd/node.yaml 0123abcd-...
    Restore {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The vfolder.
        id: uuid::Uuid,
    },
    /// Make a new vfolder that starts as a copy of another (`clone_of`);
    /// prints its uuid. The storage node copies (reflinks where it can);
    /// its status is `Cloning`, then `Ready`.
    /// Example: `vfolderd vfolder clone --config /etc/vfolderd/node.yaml 0123abcd-... --name copy`
    Clone {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The vfolder to copy.
        source: uuid::Uuid,
        /// The clone's volume (default: the source's).
        #[arg(long)]
        volume: Option<String>,
        /// The clone's name (default: the source's).
        #[arg(long)]
        name: Option<String>,
        /// The clone's owner (default: the source's).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete a vfolder's record: its directory goes to the trash and is
    /// purged after the storage nodes' `trash_retention` (making the record
    /// again before then restores it).
    ///
    /// Example: vfolderd vfolder delete --config /etc/vfolderd/node.yaml 0123abcd-...
    Delete {
        /// Node config file.
        #[arg(long)]
        config: PathBuf,
        /// The vfolder.
        id: uuid::Uuid,
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
    vfolderd::memory::limit_arenas();
    vfolderd::memory::raise_fd_limit();
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    vfolderd::error::install_panic_hook();
    match cli.cmd {
        Cmd::Run { config } => {
            let shutdown = shutdown_signal();
            let cfg = load(&config)?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let deps = vfolderd::Deps::linux(&cfg.mount_helper, cfg.mount_table);
            vfolderd::run(cfg, deps, listener, shutdown).await?;
        }
        Cmd::Apply { config, file } => {
            for name in vfolderd::cli::apply(&load(&config)?, &file).await? {
                println!("applied volume {name}");
            }
        }
        Cmd::Vfolder {
            cmd: VfolderCmd::List { config },
        } => print!("{}", vfolderd::cli::vfolder_list(&load(&config)?).await?),
        Cmd::Vfolder {
            cmd: VfolderCmd::Trash { config, id },
        } => vfolderd::cli::vfolder_set_trash(&load(&config)?, id, true).await?,
        Cmd::Vfolder {
            cmd: VfolderCmd::Restore { config, id },
        } => vfolderd::cli::vfolder_set_trash(&load(&config)?, id, false).await?,
        Cmd::Vfolder {
            cmd: VfolderCmd::Delete { config, id },
        } => vfolderd::cli::vfolder_delete(&load(&config)?, id).await?,
        Cmd::Vfolder {
            cmd:
                VfolderCmd::Clone {
                    config,
                    source,
                    volume,
                    name,
                    owner,
                },
        } => {
            let as_ = vfolderd::cli::CloneAs {
                volume,
                name,
                owner,
            };
            println!(
                "{}",
                vfolderd::cli::vfolder_clone(&load(&config)?, source, as_).await?
            );
        }
        Cmd::Vfolder {
            cmd:
                VfolderCmd::Create {
                    config,
                    volume,
                    name,
                    owner,
                    permission,
                    quota_bytes,
                },
        } => {
            let new = vfolderd::cli::NewVfolder {
                volume: volume.clone(),
                name,
                owner,
                permission,
                quota_bytes,
                clone_of: None,
            };
            let (id, placed) = vfolderd::cli::vfolder_create(&load(&config)?, &new).await?;
            if volume.is_none() {
                eprintln!("placed on volume {placed}");
            }
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
        Cmd::Dataset { cmd } => dataset(cmd).await?,
        Cmd::AcceptReset { config } => {
            print!("{}", vfolderd::cli::accept_reset(&load(&config)?).await?)
        }
        Cmd::Status { config } => print!("{}", vfolderd::cli::status(&load(&config)?).await?),
        Cmd::Get {
            config,
            kind,
            node,
            all_nodes,
            output,
            watch,
        } => {
            let cfg = load(&config)?;
            let nodes = match (all_nodes, node) {
                (true, _) => vfolderd::inspect::Nodes::All,
                (false, n) => vfolderd::inspect::Nodes::One(n.unwrap_or_else(|| cfg.node.clone())),
            };
            if watch {
                use std::io::Write;
                vfolderd::inspect::watch(&cfg, kind, &nodes, output, |s| {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(s.as_bytes());
                    let _ = out.flush();
                })
                .await?;
            } else {
                print!(
                    "{}",
                    vfolderd::inspect::get(&cfg, kind, &nodes, output).await?
                )
            }
        }
        Cmd::Plan {
            config,
            kernel,
            volume,
            output,
        } => {
            let cfg = load(&config)?;
            let object = match (kernel, volume) {
                (Some(k), _) => Some(format!("kernel/{k}")),
                (None, Some(v)) => Some(format!("volume/{v}")),
                (None, None) => None,
            };
            let view = vfolderd::plancmd::plan(&cfg, object.as_deref()).await?;
            print!("{}", vfolderd::plancmd::render(&view, output)?);
        }
        Cmd::Explain {
            config,
            kind,
            name,
            node,
            output,
        } => {
            let cfg = load(&config)?;
            let node = node.unwrap_or_else(|| cfg.node.clone());
            let e = vfolderd::inspect::explain(&cfg, kind, &name, &node).await?;
            print!("{}", vfolderd::inspect::render_explained(&e, output)?);
        }
        Cmd::Describe {
            config,
            kind,
            name,
            node,
        } => {
            let cfg = load(&config)?;
            let node = node.unwrap_or_else(|| cfg.node.clone());
            print!(
                "{}",
                vfolderd::inspect::describe(&cfg, kind, &name, &node).await?
            )
        }
    }
    Ok(())
}

async fn dataset(cmd: DatasetCmd) -> anyhow::Result<()> {
    use vfolderd::azure;
    match cmd {
        DatasetCmd::CreateContainer { config, volume } => {
            let (loc, c) = vfolderd::cli::blob_container(&load(&config)?, &volume).await?;
            let created = azure::ensure_container(&c).await?;
            println!(
                "container {} {}",
                loc.container,
                if created { "created" } else { "exists" }
            );
        }
        DatasetCmd::Push {
            config,
            volume,
            path,
            parallel,
        } => {
            let (loc, c) = vfolderd::cli::blob_container(&load(&config)?, &volume).await?;
            let files = azure::files_to_push(&path)?;
            let total: u64 = files
                .iter()
                .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("template"),
            );
            let n = files.len();
            let bytes = azure::push(&c, files, parallel, |b| bar.inc(b)).await?;
            bar.finish_and_clear();
            println!("pushed {n} files, {bytes} bytes to {}", loc.container);
        }
        DatasetCmd::Ls { config, volume } => {
            let (_, c) = vfolderd::cli::blob_container(&load(&config)?, &volume).await?;
            for b in azure::list(&c).await? {
                println!("{}\t{}\t{}", b.size, b.content_type, b.name);
            }
        }
        DatasetCmd::Sas {
            config,
            volume,
            write,
            hours,
            ..
        } => {
            let (_, c) = vfolderd::cli::blob_container(&load(&config)?, &volume).await?;
            let access = if write {
                azure::Access::Write
            } else {
                azure::Access::Read
            };
            let lifetime = std::time::Duration::from_secs_f64(hours.max(0.0) * 3600.0);
            println!(
                "{}",
                azure::container_sas(&c, access, lifetime)
                    .await?
                    .url
                    .expose()
            );
        }
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
