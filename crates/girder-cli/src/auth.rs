//! Secrets and trust shared by the verbs: the bearer token that `girder node` requires
//! ([`NodeTokenArgs`]) and that the verbs talking to a node send ([`TokenArgs`], which also
//! says which certificates to trust for `https://` nodes). Tokens come from a file or the
//! environment, so they never need to be on a command line, where `ps` shows them.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where a verb that talks to a node gets its token, and whom it trusts over TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// A file holding the bearer token (surrounding whitespace is ignored).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// The bearer token itself; prefer --token-file or the environment, which `ps` does not show.
    #[arg(long, global = true, env = "GIRDER_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// For `https://` nodes: trust only the certificates in this PEM file (e.g. the node's
    /// self-signed certificate, or the CA that signed it) instead of the system's roots.
    #[arg(long, global = true, env = "GIRDER_CA_FILE", hide_env_values = true)]
    ca_file: Option<PathBuf>,
}

/// Where `girder node` gets the tokens it accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeTokenArgs {
    /// A file holding the bearer tokens this node accepts, one per line (blank lines and
    /// lines starting with `#` are ignored). Each token is a caller of its own, with its own
    /// share of the node's slots.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The bearer token itself; prefer --token-file or the environment, which `ps` does not show.
    #[arg(long, env = "GIRDER_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
}

/// Longest token file a client reads: a token is short, and a wrong path must not read a
/// huge file.
const TOKEN_FILE_BYTES_MAX: u64 = 4_096;
/// Longest token file a node reads (one token per caller).
const NODE_TOKEN_FILE_BYTES_MAX: u64 = 1 << 20;
/// Longest certificate file read.
const CA_FILE_BYTES_MAX: u64 = 1 << 20;

/// Reads at most `bytes_max` bytes of `path` as text; more is an error.
pub fn read_secret_file(path: &Path, bytes_max: u64, what: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(bytes_max + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    anyhow::ensure!(text.len() as u64 <= bytes_max, "the {what} file {} is over {bytes_max} bytes", path.display());
    Ok(text)
}

/// The tokens in a token file's text: its lines but blank ones and comments.
fn tokens_in(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).map(str::to_owned).collect()
}

impl NodeTokenArgs {
    /// The tokens the node accepts (none: no token required); an unreadable or empty file
    /// is an error.
    pub fn tokens(&self) -> anyhow::Result<Vec<String>> {
        if let Some(path) = &self.token_file {
            let tokens = tokens_in(&read_secret_file(path, NODE_TOKEN_FILE_BYTES_MAX, "token")?);
            anyhow::ensure!(!tokens.is_empty(), "the token file {} holds no token", path.display());
            return Ok(tokens);
        }
        Ok(self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).into_iter().collect())
    }
}

impl TokenArgs {
    /// The token, if one is given; an unreadable or empty file, or one with several tokens,
    /// is an error.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            let mut tokens = tokens_in(&read_secret_file(path, TOKEN_FILE_BYTES_MAX, "token")?);
            anyhow::ensure!(!tokens.is_empty(), "the token file {} is empty", path.display());
            anyhow::ensure!(
                tokens.len() == 1,
                "the token file {} holds {} tokens; a client sends one: give it a file with its own",
                path.display(),
                tokens.len()
            );
            return Ok(tokens.pop());
        }
        Ok(self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned))
    }

    /// An HTTP client that sends the token with every request, if there is one, and trusts
    /// the certificates of `--ca-file` for `https://` nodes.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = self.token()? {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token has characters an HTTP header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = builder.default_headers(headers);
        if let Some(path) = &self.ca_file {
            let pem = read_secret_file(path, CA_FILE_BYTES_MAX, "certificate")?;
            let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
            anyhow::ensure!(!certificates.is_empty(), "{} holds no PEM certificate", path.display());
            builder = builder.tls_certs_only(certificates);
        }
        builder.build().context("cannot build an HTTP client")
    }
}

#[cfg(test)]
mod tests {
    use super::tokens_in;

    #[test]
    fn token_files_hold_one_token_per_line_with_comments() {
        assert_eq!(tokens_in("  one \n\n# team b\ntwo\r\n"), ["one", "two"]);
        assert!(tokens_in("# nothing\n \n").is_empty());
    }
}
