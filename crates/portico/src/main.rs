//! The `portico` binary: bare-metal external-IP load balancer.

mod k8s;
mod lab;
mod run;

use clap::{Parser, Subcommand};

/// portico gives Kubernetes externalIPs and bare-metal hosts what they lack: IP management,
/// failover in well under a second, load balancing with health checks, and round-robin DNS.
#[derive(Parser, Debug)]
#[command(name = "portico", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a network-namespace lab and measure VIP failover against keepalived (root only).
    Lab(lab::LabArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Lab(args) => lab::run(args).await,
    }
}
