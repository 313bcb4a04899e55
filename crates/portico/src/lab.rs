//! `portico lab`: a network-namespace lab that shows VIP failover (owned by the agent work).

/// Arguments of `portico lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {}

/// Runs the lab.
pub async fn run(_args: LabArgs) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built yet")
}
