//! The bearer token shared by `girder node` (which requires it) and the verbs that talk to
//! a node (which send it). It comes from a file or the environment, so it never needs to be
//! on a command line, where `ps` shows it.

use anyhow::Context;

/// Where the token comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// A file holding the bearer token (surrounding whitespace is ignored).
    #[arg(long, global = true)]
    token_file: Option<std::path::PathBuf>,
    /// The bearer token itself; prefer --token-file or the environment, which `ps` does not show.
    #[arg(long, global = true, env = "GIRDER_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
}

/// Longest token file read: a token is short, and a wrong path must not read a huge file.
const TOKEN_FILE_BYTES_MAX: u64 = 4_096;

impl TokenArgs {
    /// The token, if one is given; an unreadable or empty file is an error.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|file| file.take(TOKEN_FILE_BYTES_MAX).read_to_string(&mut text))
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text.trim();
            anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
            return Ok(Some(token.to_owned()));
        }
        Ok(self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned))
    }

    /// An HTTP client that sends the token with every request, if there is one.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = self.token()? {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token has characters an HTTP header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        builder.default_headers(headers).build().context("cannot build an HTTP client")
    }
}
