//! Plumbing that every backend on a container engine needs in the same shape, so that
//! each engine crate holds only what its engine forces.

use std::future::Future;
use std::net::IpAddr;

use tracing::info;

use crate::{BackendError, OwnershipLabels, Result, SessionSpec};

impl OwnershipLabels {
    /// Checks `spec` ([`SessionSpec::validate`]) and that its session name starts with
    /// this prefix, as every session of this backend must.
    pub fn validate_spec(&self, spec: &SessionSpec) -> Result<()> {
        spec.validate()?;
        if !spec.session.starts_with(self.prefix()) {
            return Err(BackendError::InvalidSpec {
                field: "session",
                message: format!(
                    "{:?} must start with the prefix {:?}; name sessions `{}-<name>`",
                    spec.session,
                    self.prefix(),
                    self.prefix()
                ),
            });
        }
        Ok(())
    }
}

/// The path of a `unix://PATH` engine address (what
/// [`ExecutionBackend::engine_socket`](crate::ExecutionBackend::engine_socket) returns);
/// `None` for any other scheme.
pub fn unix_socket_path(address: &str) -> Option<std::path::PathBuf> {
    let path = address.strip_prefix("unix://")?;
    path.starts_with('/').then(|| std::path::PathBuf::from(path))
}

impl BackendError {
    /// [`BackendError::NotFound`] for `session`.
    pub fn not_found(backend: &'static str, session: &str) -> Self {
        Self::NotFound { backend, session: session.to_owned() }
    }

    /// [`BackendError::AlreadyExists`] for a container or volume (`what`) named `name`
    /// that exists and is not owned by this daemon instance, so it is left alone.
    pub fn not_owned(backend: &'static str, what: &str, name: &str) -> Self {
        Self::AlreadyExists {
            backend,
            session: name.to_owned(),
            detail: format!(
                "a {what} of that name exists and is not owned by this agentd instance, so it is left alone"
            ),
        }
    }
}

/// Creates a session's container with `create`, never reusing an old one of the same
/// name: when the name is taken, `find_owned` looks for it among this instance's
/// containers; a stale one of ours is removed with `remove` and the create runs again,
/// anyone else's is left alone and the create fails with
/// [`BackendError::AlreadyExists`]. `create` must map the engine's "name in use" to
/// `AlreadyExists`.
pub async fn create_replacing_stale<T, C, CF, F, FF, R, RF>(
    backend: &'static str,
    session: &str,
    create: C,
    find_owned: F,
    remove: R,
) -> Result<String>
where
    C: Fn() -> CF,
    CF: Future<Output = Result<String>>,
    F: FnOnce() -> FF,
    FF: Future<Output = Result<Option<T>>>,
    R: FnOnce(T) -> RF,
    RF: Future<Output = Result<()>>,
{
    match create().await {
        Err(BackendError::AlreadyExists { detail, .. }) => {
            let Some(stale) = find_owned().await? else {
                return Err(BackendError::AlreadyExists {
                    backend,
                    session: session.to_owned(),
                    detail: format!("{detail}; it is not owned by this agentd instance, so it is left alone"),
                });
            };
            info!(backend, session, "Replacing a stale container of the same session.");
            remove(stale).await?;
            create().await
        }
        other => other,
    }
}

/// The host's address on an engine network: the first IPv4 candidate (its gateway, say)
/// that is an address of this host, which is checked by binding to it. With
/// `engine_is_local`, a candidate counts without the check, for engines that bring a
/// network's bridge (and its address) up only while a container uses it. With a remote
/// engine there is usually none.
pub fn host_address(candidates: impl IntoIterator<Item = IpAddr>, engine_is_local: bool) -> Option<IpAddr> {
    candidates
        .into_iter()
        .filter(IpAddr::is_ipv4)
        .find(|ip| engine_is_local || std::net::UdpSocket::bind((*ip, 0)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_name_without_the_prefix_is_refused_naming_the_fix() {
        let owner = OwnershipLabels::new("agentd", "i1").expect("labels");
        owner.validate_spec(&SessionSpec::new("agentd-a", "id", "img:1")).expect("prefixed");
        match owner.validate_spec(&SessionSpec::new("other-a", "id", "img:1")) {
            Err(BackendError::InvalidSpec { field: "session", message }) => {
                assert!(message.contains("agentd-<name>"), "{message}")
            }
            other => panic!("expected InvalidSpec(session), got {other:?}"),
        }
    }

    #[test]
    fn only_an_address_of_this_host_counts_unless_the_engine_is_local() {
        let loopback: IpAddr = "127.0.0.1".parse().expect("ip");
        let test_net: IpAddr = "192.0.2.123".parse().expect("ip");
        let v6: IpAddr = "::1".parse().expect("ip");
        assert_eq!(host_address([v6, test_net, loopback], false), Some(loopback));
        assert_eq!(host_address([test_net], false), None, "TEST-NET-1 is no address of this host");
        assert_eq!(host_address([v6, test_net], true), Some(test_net));
    }

    #[test]
    fn only_unix_addresses_name_a_socket() {
        assert_eq!(unix_socket_path("unix:///var/run/docker.sock"), Some("/var/run/docker.sock".into()));
        assert_eq!(unix_socket_path("tcp://127.0.0.1:2375"), None);
        assert_eq!(unix_socket_path("unix://relative.sock"), None);
    }

    #[tokio::test]
    async fn a_stale_container_is_replaced_and_a_foreign_one_left_alone() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let taken =
            || async { Err(BackendError::AlreadyExists { backend: "t", session: "s".into(), detail: "taken".into() }) };
        // Foreign: nothing of ours under that name.
        let outcome = create_replacing_stale("t", "s", taken, || async { Ok(None::<()>) }, |()| async { Ok(()) }).await;
        match outcome {
            Err(BackendError::AlreadyExists { detail, .. }) => assert!(detail.contains("not owned"), "{detail}"),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        // Stale: removed once, then created.
        let calls = AtomicUsize::new(0);
        let removed = AtomicUsize::new(0);
        let create = || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(BackendError::AlreadyExists { backend: "t", session: "s".into(), detail: "taken".into() })
            } else {
                Ok("new-id".to_owned())
            }
        };
        let remove = |id: String| {
            assert_eq!(id, "old-id");
            removed.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        };
        let id = create_replacing_stale("t", "s", create, || async { Ok(Some("old-id".to_owned())) }, remove).await;
        assert_eq!(id.expect("created"), "new-id");
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

/// A session's addresses from the engine's view of its networks (each network's IPv4 and
/// IPv6 address as text, missing or empty ones included): parsed, sorted, without repeats.
pub fn session_addresses<'a>(addresses: impl IntoIterator<Item = Option<&'a str>>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addresses.into_iter().flatten().filter_map(|a| a.parse().ok()).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod session_addresses_tests {
    use super::*;

    #[test]
    fn addresses_are_parsed_sorted_and_deduplicated() {
        let got = session_addresses([
            Some("10.88.0.5"),
            None,
            Some(""),
            Some("fd00::5"),
            Some("10.88.0.5"),
            Some("172.17.0.2"),
        ]);
        let want: Vec<IpAddr> = ["10.88.0.5", "172.17.0.2", "fd00::5"].iter().map(|a| a.parse().expect("ip")).collect();
        assert_eq!(got, want);
    }
}
