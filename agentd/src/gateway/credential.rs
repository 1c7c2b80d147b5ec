//! The daemon's model credential: read once at start from `[model]` or the daemon's
//! environment, kept in memory, sent only upstream. Never shown: `Debug` is redacted and
//! no error names the value.

use std::fmt;

use anyhow::{bail, Context, Result};
use axum::http::{HeaderName, HeaderValue};

use crate::config::ModelConfig;

/// The `anthropic-beta` flag a request authenticated with an OAuth token carries (as Claude
/// Code sends it when it holds a `CLAUDE_CODE_OAUTH_TOKEN`).
pub const OAUTH_BETA: &str = "oauth-2025-04-20";

/// How the credential travels upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// An API key, sent as `x-api-key`.
    ApiKey,
    /// An OAuth token, sent as `Authorization: Bearer` with [`OAUTH_BETA`].
    OAuthToken,
}

/// The real model credential.
#[derive(Clone)]
pub struct Credential {
    kind: CredentialKind,
    /// Where it came from, for the start-up log: a config key or a variable name.
    source: &'static str,
    /// The header value, marked sensitive.
    value: HeaderValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl Credential {
    /// The credential of `[model]`: the first line of `model.api_key_file` (an API key);
    /// else the daemon's `ANTHROPIC_API_KEY` (an API key); else its
    /// `CLAUDE_CODE_OAUTH_TOKEN` (an OAuth token). `None` when there is none; `env` reads
    /// the daemon's environment (tests pass their own).
    pub fn resolve(model: &ModelConfig, env: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if let Some(path) = &model.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("model.api_key_file = {}: cannot be read", path.display()))?;
            let key = text.lines().next().map(str::trim).unwrap_or_default();
            if key.is_empty() {
                bail!("model.api_key_file = {}: the file's first line must hold the API key", path.display());
            }
            return Self::new(CredentialKind::ApiKey, "model.api_key_file", key).map(Some);
        }
        let from_env = |name: &'static str, kind| -> Result<Option<Self>> {
            match env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
                Some(value) => Self::new(kind, name, &value).map(Some),
                None => Ok(None),
            }
        };
        if let Some(credential) = from_env("ANTHROPIC_API_KEY", CredentialKind::ApiKey)? {
            return Ok(Some(credential));
        }
        from_env("CLAUDE_CODE_OAUTH_TOKEN", CredentialKind::OAuthToken)
    }

    /// [`Credential::resolve`] with the daemon's own environment.
    pub fn from_daemon(model: &ModelConfig) -> Result<Option<Self>> {
        Self::resolve(model, |name| std::env::var(name).ok())
    }

    /// A credential of `kind` from `source` with the text `secret`.
    pub fn new(kind: CredentialKind, source: &'static str, secret: &str) -> Result<Self> {
        let text = match kind {
            CredentialKind::ApiKey => secret.to_owned(),
            CredentialKind::OAuthToken => format!("Bearer {secret}"),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            anyhow::anyhow!("{source}: the credential holds characters an HTTP header cannot carry (check the value)")
        })?;
        value.set_sensitive(true);
        Ok(Self { kind, source, value })
    }

    /// How it travels.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// Where it came from: `model.api_key_file`, `ANTHROPIC_API_KEY` or
    /// `CLAUDE_CODE_OAUTH_TOKEN`.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The header that carries it, and its (sensitive) value.
    pub(crate) fn header(&self) -> (HeaderName, HeaderValue) {
        let name = match self.kind {
            CredentialKind::ApiKey => HeaderName::from_static("x-api-key"),
            CredentialKind::OAuthToken => axum::http::header::AUTHORIZATION,
        };
        (name, self.value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn the_file_wins_then_the_api_key_then_the_oauth_token() {
        let dir = std::env::temp_dir().join(format!("agentd-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, "sk-from-file\nignored\n").expect("write");
        let both = [("ANTHROPIC_API_KEY", "sk-env"), ("CLAUDE_CODE_OAUTH_TOKEN", "oat-env")];
        let with_file = ModelConfig { api_key_file: Some(file.clone()), ..ModelConfig::default() };
        let c = Credential::resolve(&with_file, env(&both)).expect("ok").expect("some");
        assert_eq!((c.kind(), c.source()), (CredentialKind::ApiKey, "model.api_key_file"));
        assert_eq!(c.header().1.to_str().expect("ascii"), "sk-from-file");

        let plain = ModelConfig::default();
        let c = Credential::resolve(&plain, env(&both)).expect("ok").expect("some");
        assert_eq!((c.kind(), c.header().0.as_str()), (CredentialKind::ApiKey, "x-api-key"));
        let c = Credential::resolve(&plain, env(&both[1..])).expect("ok").expect("some");
        assert_eq!((c.kind(), c.header().0.as_str()), (CredentialKind::OAuthToken, "authorization"));
        assert_eq!(c.header().1.to_str().expect("ascii"), "Bearer oat-env");
        assert!(c.header().1.is_sensitive());
        assert!(Credential::resolve(&plain, env(&[("ANTHROPIC_API_KEY", " ")])).expect("ok").is_none());
        assert!(!format!("{c:?}").contains("oat-env"));

        std::fs::write(&file, "\n").expect("write");
        let error = Credential::resolve(&with_file, env(&[])).expect_err("empty file").to_string();
        assert!(error.contains("first line"), "{error}");
        let bad = Credential::resolve(&plain, env(&[("ANTHROPIC_API_KEY", "sk-\u{7}bell")])).expect_err("bad");
        assert!(!bad.to_string().contains("bell"), "{bad}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
