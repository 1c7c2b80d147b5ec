//! Ownership labels: how a backend knows which containers are its own.

use std::collections::BTreeMap;

/// Label holding the backend prefix that created the container.
pub const LABEL_PREFIX: &str = "agentd.prefix";
/// Label holding the session name (the container name).
pub const LABEL_SESSION: &str = "agentd.session";
/// Label holding the id of the agent the container runs.
pub const LABEL_AGENT_ID: &str = "agentd.agent-id";
/// Label holding the id of the agentd instance that owns the container.
pub const LABEL_INSTANCE: &str = "agentd.instance";

/// The identity a backend stamps on every container it creates and filters on in every
/// listing: a prefix **and** the id of the owning daemon instance.
///
/// Two daemons on one host (even with the same prefix) never see, adopt or remove each
/// other's containers, and a container without these labels is never ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnershipLabels {
    prefix: String,
    instance: String,
}

impl OwnershipLabels {
    /// Ownership for `prefix` and daemon `instance`. Both must be non-empty label values
    /// made of `[A-Za-z0-9_.-]`; the prefix also starts every session name.
    pub fn new(prefix: impl Into<String>, instance: impl Into<String>) -> crate::Result<Self> {
        let (prefix, instance) = (prefix.into(), instance.into());
        check_label_value("prefix", &prefix)?;
        check_label_value("instance", &instance)?;
        Ok(Self { prefix, instance })
    }

    /// The prefix of every session name and the value of [`LABEL_PREFIX`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The daemon instance id, the value of [`LABEL_INSTANCE`].
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The labels for one session of one agent.
    pub fn labels_for(&self, session: &str, agent_id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_PREFIX.to_owned(), self.prefix.clone()),
            (LABEL_INSTANCE.to_owned(), self.instance.clone()),
            (LABEL_SESSION.to_owned(), session.to_owned()),
            (LABEL_AGENT_ID.to_owned(), agent_id.to_owned()),
        ])
    }

    /// Whether a container with these labels belongs to this prefix and instance.
    pub fn owns(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(LABEL_PREFIX) == Some(&self.prefix)
            && labels.get(LABEL_INSTANCE) == Some(&self.instance)
            && labels.contains_key(LABEL_SESSION)
    }

    /// Engine label filters (`key=value`) that select exactly the owned containers.
    pub fn label_filters(&self) -> Vec<String> {
        vec![format!("{LABEL_PREFIX}={}", self.prefix), format!("{LABEL_INSTANCE}={}", self.instance)]
    }
}

fn check_label_value(what: &'static str, value: &str) -> crate::Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(crate::BackendError::InvalidSpec {
            field: what,
            message: format!("{value:?} must be 1 to 63 characters from [A-Za-z0-9_.-]"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_instance_with_the_same_prefix_is_not_owned() {
        let ours = OwnershipLabels::new("agentd", "inst-a").expect("valid");
        let theirs = OwnershipLabels::new("agentd", "inst-b").expect("valid");
        let labels = theirs.labels_for("agentd-x", "id");
        assert!(theirs.owns(&labels));
        assert!(!ours.owns(&labels));
        assert!(!ours.owns(&BTreeMap::new()));
    }

    #[test]
    fn bad_prefix_is_rejected_naming_the_field() {
        let err = OwnershipLabels::new("bad prefix", "i").expect_err("space is not allowed");
        assert!(err.to_string().contains("prefix"), "{err}");
    }
}
