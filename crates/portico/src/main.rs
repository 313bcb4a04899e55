//! The `portico` binary: bare-metal external-IP load balancer.

mod bgp;
mod demo;
mod ecmp;
mod follow;
mod k8s;
mod lab;
mod metrics;
mod observe;
mod run;
mod source;
mod supervise;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use model::Desired;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::source::ConfigPath;

/// mimalloc instead of glibc's malloc. A connection allocates its task (3.5 KiB with the relay's
/// state, aligned to a cache line) and frees it on another path than glibc's per-thread cache
/// covers: in a profile of `Connection: close` traffic, glibc's `_int_malloc`, `_int_free`,
/// `unlink_chunk` and `_int_memalign` took 2 % of a proxy worker's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// portico gives Kubernetes externalIPs and bare-metal hosts what they lack: IP management,
/// VIP failover in well under a second, L4 load balancing with health checks and circuit
/// breakers, and health-aware round-robin DNS — in one binary.
///
/// Start with `portico run` (an embedded demo on 127.0.0.10:8080), then
/// `portico status` in another terminal.
#[derive(Parser, Debug)]
#[command(name = "portico", version, about, long_about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter, RUST_LOG syntax (e.g. `info`, `portico=debug,lb=trace`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,

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
    /// Run standalone from a YAML file: balance, fail VIPs over, serve DNS and the admin API.
    ///
    /// Without --config, runs an embedded demo: a service on 127.0.0.10:8080 balancing two demo
    /// backends that portico starts on 127.0.0.1:8081 and :8082, DNS on 127.0.0.1:5353
    /// (`dig @127.0.0.1 -p 5353 demo.portico.local`) and the admin API on 127.0.0.1:9440.
    /// The file is reloaded on SIGHUP and whenever it changes; an invalid file is rejected and
    /// the running configuration kept. SIGTERM hands VIPs over, drains, and exits 0.
    Run {
        /// The YAML configuration (see docs/config.md and examples/portico.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration: print the effective config (defaults filled in) or every error.
    Check {
        /// The YAML configuration to check.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running instance: services, VIPs and their owners, backends with health and breaker state.
    Status {
        /// Admin API address of the running instance.
        #[arg(long, default_value = "127.0.0.1:9440")]
        admin: String,
        /// Print the raw JSON report instead of tables.
        #[arg(long)]
        json: bool,
        /// Then follow the event timeline (ownership moves, health, ejections, reloads,
        /// conflicts), one line per event, until interrupted (with --json: JSON lines).
        #[arg(long)]
        watch: bool,
    },
    /// Print the version.
    Version,
    /// Run the Kubernetes IPAM controller (one active replica through a Lease).
    Controller(k8s::ControllerArgs),
    /// Run the node agent driven by Kubernetes Services and EndpointSlices (a DaemonSet).
    Agent(k8s::AgentArgs),
    /// Print portico's CustomResourceDefinitions as YAML.
    Crds(k8s::CrdsArgs),
    /// Build a network-namespace lab and measure VIP failover (root only): by ARP against
    /// keepalived (`--announce l2`), or by BGP with BFD through BIRD or FRR against FRR as the
    /// reference speaker (`--announce bgp --router bird|frr`).
    Lab(lab::LabArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let mut filter = tracing_subscriber::EnvFilter::try_new(filter).with_context(|| {
        format!("--log / RUST_LOG `{filter}` is not a valid filter; try `info` or `portico=debug`")
    })?;
    // kube-client logs every failed request at ERROR ("failed with error …"): during an API
    // outage that is a line per retry. Kubernetes mode logs each outage once itself; name
    // `kube_client` in the filter to see them again.
    if !filter.to_string().contains("kube_client") {
        filter = filter.add_directive("kube_client::client::builder=off".parse()?);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let result = dispatch_inner(command).await;
    // Whether the run ended on a signal or an error: put back the sysctls the agent changed
    // (arp_ignore/arp_announce of the announcing interfaces).
    restore_sysctls();
    result
}

/// Writes back every sysctl this process changed and logs each.
fn restore_sysctls() {
    for (c, outcome) in sys::sysctl_restore() {
        match outcome {
            Ok(true) => tracing::info!(key = %c.key, value = %c.before, "sysctl restored"),
            Ok(false) => tracing::info!(
                key = %c.key,
                "sysctl changed by someone else since portico set it; left as it is"
            ),
            Err(e) => tracing::warn!(key = %c.key, value = %c.before, "cannot restore sysctl: {e}"),
        }
    }
}

async fn dispatch_inner(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(config).await.map(|()| ExitCode::SUCCESS),
        Command::Check { config } => {
            let env = source::environment();
            match source::load(&ConfigPath::File(config.clone()), &env) {
                Ok(cfg) => {
                    print!("{}", model::config::to_yaml(&cfg));
                    if cfg.services.is_empty() {
                        eprintln!(
                            "warning: {}: no services, so portico would balance nothing (a running node refuses to reload to a file without services unless it writes `services: []`)",
                            config.display()
                        );
                    }
                    eprintln!("{}: valid", config.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Status { admin, json, watch } => {
            let addr = run::parse_admin_url(&admin).map_err(anyhow::Error::msg)?;
            let report = admin::client::status(addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", table::render(&report));
            }
            if watch {
                follow::follow(addr, json).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("portico {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller(args) => k8s::controller(args).await.map(|()| ExitCode::SUCCESS),
        Command::Agent(args) => k8s::agent(args).await.map(|()| ExitCode::SUCCESS),
        Command::Crds(args) => k8s::crds(args).map(|()| ExitCode::SUCCESS),
        Command::Lab(args) => lab::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let env = source::environment();
    let path = match config {
        Some(p) => ConfigPath::File(p),
        None => ConfigPath::Embedded,
    };
    let cfg = source::load(&path, &env)?;
    if cfg.services.is_empty() {
        tracing::warn!("the configuration has no services: nothing to balance");
    }
    let shutdown = shutdown_on_signal();
    if matches!(path, ConfigPath::Embedded) {
        tracing::info!(
            "no --config given: running the embedded demo (try: curl http://127.0.0.10:8080/)"
        );
        demo::start(shutdown.clone()).await;
    }
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired {
        generation: 1,
        config: Arc::new(cfg),
    }));
    let (err_tx, err_rx) = watch::channel(None);
    tokio::spawn(source::supervise(
        {
            let (err_tx, shutdown) = (err_tx.clone(), shutdown.clone());
            move || {
                source::watch(
                    path.clone(),
                    env.clone(),
                    desired_tx.clone(),
                    err_tx.clone(),
                    Duration::from_secs(1),
                    shutdown.clone(),
                )
            }
        },
        err_tx,
        shutdown.clone(),
    ));
    let (own_tx, _) = watch::channel(Arc::new(model::OwnershipView::new()));
    run::serve(desired_rx, err_rx, own_tx, run::Hooks::default(), shutdown).await
}

/// A token cancelled on SIGTERM or SIGINT.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(signals(token.clone()));
    token
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop portico with SIGKILL");
        return;
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{which} received");
    shutdown.cancel();
}
