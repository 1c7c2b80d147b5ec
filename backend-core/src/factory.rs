//! Backend registration: every backend crate exports one [`BackendFactory`] (its
//! configuration section and its constructor), and the daemon keeps a list of them, one
//! line per backend, from which `backend = "<name>"` picks.
//!
//! A backend's section (`[docker]`, `[podman]`, …) reaches its factory in JSON's data
//! model ([`Section`]); the factory deserializes its own config type from it
//! ([`parse_section`]), so the daemon needs to know nothing about a backend's keys.

use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ExecutionBackend, OwnershipLabels, Result};

/// A backend's configuration section as the daemon read it (`[<name>]` in its
/// configuration), in JSON's data model. A missing section is an empty object.
pub type Section = serde_json::Value;

/// A problem with a backend's configuration section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key within the section (`socket`, `request_timeout_secs`); empty for the
    /// section as a whole.
    pub key: String,
    /// The offending value as written, when the problem is a value (rather than a type
    /// or an unknown key).
    pub value: Option<String>,
    /// What was wrong, or what is allowed.
    pub message: String,
}

impl ConfigProblem {
    /// A value that breaks a rule: `key = value: allowed`.
    pub fn value(key: impl Into<String>, value: impl Into<String>, allowed: impl Into<String>) -> Self {
        Self { key: key.into(), value: Some(value.into()), message: allowed.into() }
    }
}

/// A backend's configuration type: the section's keys, with defaults for the missing
/// ones (`#[serde(default, deny_unknown_fields)]`).
pub trait BackendConfig: Serialize + DeserializeOwned + Default {
    /// Checks the values no type rules out; every problem names its key.
    fn check(&self) -> Vec<ConfigProblem> {
        Vec::new()
    }
}

/// Parses a section into the backend's config type. The error names the key (the path
/// within the section) and says what was wrong: an unknown key, with the allowed ones,
/// or a value of the wrong type.
pub fn parse_section<T: BackendConfig>(section: &Section) -> std::result::Result<T, ConfigProblem> {
    let empty = Section::Object(serde_json::Map::new());
    let section = if section.is_null() { &empty } else { section };
    serde_path_to_error::deserialize(section).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { String::new() } else { path };
        ConfigProblem { key, value: None, message: e.into_inner().to_string() }
    })
}

/// The checks of the keys every engine backend's section shares: `socket` (see
/// [`check_engine_address`]), `request_timeout_secs` (1 to 3600) and `isolated_network`
/// (an engine object name).
pub fn check_engine_connection(
    socket: Option<&str>,
    request_timeout: std::time::Duration,
    isolated_network: &str,
) -> Vec<ConfigProblem> {
    let mut problems: Vec<ConfigProblem> = check_engine_address("socket", socket).into_iter().collect();
    if !(1..=3600).contains(&request_timeout.as_secs()) {
        let secs = request_timeout.as_secs().to_string();
        problems.push(ConfigProblem::value("request_timeout_secs", secs, "1 to 3600 (seconds)"));
    }
    if let Err(allowed) = crate::rules::engine_name(isolated_network) {
        problems.push(ConfigProblem::value("isolated_network", format!("{isolated_network:?}"), allowed));
    }
    problems
}

/// Checks an engine address key: `unix://`, `tcp://` or `http://`.
pub fn check_engine_address(key: &str, address: Option<&str>) -> Option<ConfigProblem> {
    let address = address?;
    let ok = ["unix://", "tcp://", "http://"].iter().any(|scheme| address.starts_with(scheme));
    (!ok).then(|| ConfigProblem::value(key, format!("{address:?}"), "use unix:///path/to.sock or tcp://host:port"))
}

/// One backend as the daemon registers it: its name, its configuration section and its
/// constructor. Implemented by a unit struct in each backend crate (`backend_docker::Factory`).
#[async_trait]
pub trait BackendFactory: Send + Sync + 'static {
    /// The value of `backend = "<name>"`, and the name of the backend's configuration
    /// section. Lowercase; never `auto`.
    fn name(&self) -> &'static str;

    /// Whether `backend = "auto"` tries this backend (in registration order, the first
    /// that is not unavailable wins). Engines say yes; the in-memory mock says no.
    fn auto(&self) -> bool {
        false
    }

    /// Parses the section (types and keys) and returns it with every key, the missing
    /// ones at their defaults, for `config show`.
    fn parse(&self, section: &Section) -> std::result::Result<Section, ConfigProblem>;

    /// Checks the values of a section that parses; every problem names its key.
    fn check(&self, section: &Section) -> Vec<ConfigProblem>;

    /// Connects to the engine with the section's settings.
    async fn connect(&self, section: Section, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>>;
}

/// The typed way to register a backend: name its config type and its constructor, and
/// [`BackendFactory`] comes with it (parsing, checking and connecting through
/// [`parse_to_section`], [`check_section`] and [`connect_config`]).
#[async_trait]
pub trait TypedFactory: Send + Sync + 'static {
    /// The backend's section, `[<NAME>]`.
    type Config: BackendConfig + Send;
    /// [`BackendFactory::name`].
    const NAME: &'static str;
    /// [`BackendFactory::auto`].
    const AUTO: bool = false;

    /// Connects to the engine with the parsed section.
    async fn connect_with(&self, config: Self::Config, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>>;
}

#[async_trait]
impl<F: TypedFactory> BackendFactory for F {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn auto(&self) -> bool {
        F::AUTO
    }

    fn parse(&self, section: &Section) -> std::result::Result<Section, ConfigProblem> {
        parse_to_section::<F::Config>(section)
    }

    fn check(&self, section: &Section) -> Vec<ConfigProblem> {
        check_section::<F::Config>(section)
    }

    async fn connect(&self, section: Section, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        let config: F::Config = connect_config(F::NAME, &section)?;
        self.connect_with(config, owner).await
    }
}

impl std::fmt::Debug for dyn BackendFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendFactory").field("name", &self.name()).finish()
    }
}

/// Parses the section for [`BackendFactory::connect`]: a section that does not parse is
/// [`crate::BackendError::InvalidConfig`].
pub fn connect_config<T: BackendConfig>(backend: &'static str, section: &Section) -> Result<T> {
    parse_section(section).map_err(|p| crate::BackendError::InvalidConfig { backend, key: p.key, message: p.message })
}

/// [`BackendFactory::parse`] for a backend whose config type is `T`.
pub fn parse_to_section<T: BackendConfig>(section: &Section) -> std::result::Result<Section, ConfigProblem> {
    let config: T = parse_section(section)?;
    serde_json::to_value(config).map_err(|e| ConfigProblem { key: String::new(), value: None, message: e.to_string() })
}

/// [`BackendFactory::check`] for a backend whose config type is `T`.
pub fn check_section<T: BackendConfig>(section: &Section) -> Vec<ConfigProblem> {
    match parse_section::<T>(section) {
        Ok(config) => config.check(),
        Err(problem) => vec![problem],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Example {
        socket: Option<String>,
        timeout_secs: u64,
    }

    impl BackendConfig for Example {
        fn check(&self) -> Vec<ConfigProblem> {
            check_engine_address("socket", self.socket.as_deref()).into_iter().collect()
        }
    }

    #[test]
    fn sections_parse_with_defaults_and_name_the_bad_key() {
        let parsed: Example = parse_section(&serde_json::json!({ "timeout_secs": 3 })).expect("parses");
        assert_eq!(parsed, Example { socket: None, timeout_secs: 3 });
        assert_eq!(parse_section::<Example>(&Section::Null).expect("null is empty"), Example::default());
        let unknown = parse_section::<Example>(&serde_json::json!({ "sockt": "x" })).expect_err("unknown key");
        assert!(unknown.message.contains("sockt") && unknown.message.contains("socket"), "{unknown:?}");
        let wrong = parse_section::<Example>(&serde_json::json!({ "timeout_secs": "soon" })).expect_err("type");
        assert_eq!(wrong.key, "timeout_secs");
        assert!(wrong.message.contains("soon"), "{wrong:?}");
        let full = parse_to_section::<Example>(&serde_json::json!({})).expect("parses");
        assert_eq!(full, serde_json::json!({ "socket": null, "timeout_secs": 0 }));
        let bad = check_section::<Example>(&serde_json::json!({ "socket": "/x.sock" }));
        assert_eq!(
            bad,
            vec![ConfigProblem::value("socket", "\"/x.sock\"", "use unix:///path/to.sock or tcp://host:port")]
        );
    }
}
