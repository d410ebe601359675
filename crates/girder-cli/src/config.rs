//! `girder config get|set|unset NODE [KEY [VALUE]]`: per-node configuration in the
//! statekeeper; running nodes apply changes with their next heartbeat.

use girder::config::{self, ConfigError};
use girder::ResultStoreConfig;

/// Arguments of `girder config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    op: ConfigOp,
    /// The statekeeper holding the grid's configuration: a redis:// URL. Required: an
    /// embedded statekeeper lives in one process, so a separate command cannot reach it.
    #[arg(long, global = true, env = "GIRDER_STATEKEEPER", hide_env_values = true)]
    statekeeper: Option<String>,
    #[command(flatten)]
    password: crate::serve::PasswordArgs,
    /// The grid's namespace.
    #[arg(long, global = true, default_value = "girder")]
    namespace: String,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigOp {
    /// Print NODE's configuration, one `key = value` per line.
    Get {
        /// The node's id.
        node: String,
    },
    /// Set KEY (slots, max-memory, cpus) to VALUE for NODE.
    Set {
        /// The node's id.
        node: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove KEY for NODE: it goes back to what it started with.
    Unset {
        /// The node's id.
        node: String,
        /// The key.
        key: String,
    },
}

pub async fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let Some(spec) = args.statekeeper.as_deref().filter(|s| *s != "embedded") else {
        anyhow::bail!(
            "girder config needs the grid's statekeeper: pass --statekeeper redis://HOST:PORT/DB or set \
             GIRDER_STATEKEEPER (an embedded grid's configuration lives inside its own process)"
        );
    };
    let statekeeper =
        crate::serve::open_statekeeper_with(spec, &args.password, &args.namespace, ResultStoreConfig::default(), 3_000)
            .await?;
    let store = statekeeper.structures();
    match args.op {
        ConfigOp::Get { node } => {
            for (key, value) in config::get(&store, &node).await? {
                outln!("{key} = {value}");
            }
        }
        ConfigOp::Set { node, key, value } => config::set(&store, &node, &key, &value).await?,
        ConfigOp::Unset { node, key } => {
            if !config::unset(&store, &node, &key).await? {
                return Err(ConfigError::UnknownKey(format!("{key} (not set for {node})")).into());
            }
        }
    }
    Ok(())
}
