//! Mapping between backend-core's types and bollard's.

use std::collections::{BTreeMap, HashMap};

use backend_core::{
    parse_engine_time, HealthCheckSpec, NetworkPolicy, OwnershipLabels, SessionExitInfo, SessionHealth, SessionSpec,
    SessionState, SessionStatus,
};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerState, ContainerStateStatusEnum, ContainerSummary,
    ContainerSummaryStateEnum, HealthConfig, HealthStatusEnum, HostConfig, HostConfigLogConfig, Mount, MountType,
};
use time::OffsetDateTime;

/// Where a session's network policy puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetworkPlan {
    /// The Docker network mode (`bridge`, a network name, `none`, `host`).
    pub mode: String,
    /// Extra `/etc/hosts` entries.
    pub extra_hosts: Vec<String>,
}

/// The container to create for `spec`: the agent as main process, ownership labels,
/// limits and hardening.
pub(crate) fn create_body(spec: &SessionSpec, owner: &OwnershipLabels, network: NetworkPlan) -> ContainerCreateBody {
    let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
    labels.extend(owner.labels_for(&spec.session, &spec.agent_id));

    let mut mounts = Vec::new();
    if let Some(dir) = &spec.workdir {
        mounts.push(bind(dir.to_string_lossy().into_owned(), "/workspace".into(), false));
    }
    for m in &spec.mounts {
        mounts.push(bind(
            m.source.to_string_lossy().into_owned(),
            m.target.to_string_lossy().into_owned(),
            m.read_only,
        ));
    }
    for v in &spec.volumes {
        mounts.push(Mount {
            source: Some(v.name.clone()),
            target: Some(v.target.to_string_lossy().into_owned()),
            typ: Some(MountType::VOLUME),
            read_only: Some(false),
            ..Mount::default()
        });
    }
    let memory = spec.resources.memory_bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        memory,
        // Swap limited to the memory limit: no swap, so an overrun is an OOM kill.
        memory_swap: memory,
        nano_cpus: spec.resources.cpus.map(|c| (c * 1e9) as i64),
        pids_limit: spec.resources.pids_limit,
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(spec.read_only_rootfs),
        tmpfs: spec
            .read_only_rootfs
            .then(|| HashMap::from([("/tmp".to_owned(), "rw,noexec,nosuid,size=64m".to_owned())])),
        mounts: (!mounts.is_empty()).then_some(mounts),
        network_mode: Some(network.mode),
        extra_hosts: (!network.extra_hosts.is_empty()).then_some(network.extra_hosts),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".into(), LOG_MAX_SIZE.into()),
                ("max-file".into(), LOG_MAX_FILES.into()),
            ])),
        }),
        ..HostConfig::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.command.clone(),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        user: spec.user.clone(),
        working_dir: spec.workdir.as_ref().map(|_| "/workspace".to_owned()),
        labels: Some(labels),
        stop_signal: Some("SIGTERM".into()),
        stop_timeout: Some(grace_secs(spec.stop_grace)),
        healthcheck: health_config(&spec.health_check),
        host_config: Some(host_config),
        open_stdin: Some(spec.stdin_open),
        stdin_once: Some(false),
        attach_stdin: Some(spec.stdin_open),
        tty: Some(false),
        ..ContainerCreateBody::default()
    }
}

/// The json-file log of an agent's container: rotated at 32 MiB, 5 files kept (160 MiB).
/// The log is where agentd reads an agent's output from, so a burst the daemon cannot
/// keep up with (a CPU-starved host) is lost once it is rotated away: 160 MiB holds
/// the largest burst the daemon bounds its memory for (a 64 MiB line and sixteen 4 MiB
/// ones, about 128 MiB), where 10 MiB × 3 lost a turn's result line in CI.
const LOG_MAX_SIZE: &str = "32m";
const LOG_MAX_FILES: &str = "5";

fn bind(source: String, target: String, read_only: bool) -> Mount {
    Mount {
        source: Some(source),
        target: Some(target),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Mount::default()
    }
}

/// A grace period in whole seconds, rounded up (the engine counts seconds).
pub(crate) fn grace_secs(grace: std::time::Duration) -> i64 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn health_config(spec: &HealthCheckSpec) -> Option<HealthConfig> {
    let nanos = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match spec {
        HealthCheckSpec::Image => None,
        HealthCheckSpec::Disabled => Some(HealthConfig { test: Some(vec!["NONE".into()]), ..HealthConfig::default() }),
        HealthCheckSpec::Override(check) => Some(HealthConfig {
            test: Some(std::iter::once("CMD".to_owned()).chain(check.command.iter().cloned()).collect()),
            interval: Some(nanos(check.interval)),
            timeout: Some(nanos(check.timeout)),
            retries: Some(i64::from(check.retries)),
            // Docker 20.10 rejects an explicit zero start period: leave it out.
            start_period: (!check.start_period.is_zero()).then(|| nanos(check.start_period)),
            ..HealthConfig::default()
        }),
    }
}

/// Where the network policy puts a container. `isolated_network` is the internal network
/// agentd created for isolated sessions.
pub(crate) fn network_plan(policy: NetworkPolicy, isolated_network: &str) -> NetworkPlan {
    match policy {
        NetworkPolicy::Internet => {
            NetworkPlan { mode: "bridge".into(), extra_hosts: vec!["host.docker.internal:host-gateway".into()] }
        }
        NetworkPolicy::Isolated => NetworkPlan { mode: isolated_network.to_owned(), extra_hosts: Vec::new() },
        NetworkPolicy::None => NetworkPlan { mode: "none".into(), extra_hosts: Vec::new() },
        NetworkPolicy::Host => NetworkPlan { mode: "host".into(), extra_hosts: Vec::new() },
    }
}

fn status_of(state: Option<ContainerStateStatusEnum>) -> SessionStatus {
    match state {
        Some(ContainerStateStatusEnum::CREATED) => SessionStatus::Created,
        Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING) => SessionStatus::Running,
        Some(ContainerStateStatusEnum::PAUSED) => SessionStatus::Paused,
        _ => SessionStatus::Exited,
    }
}

pub(crate) fn status_of_summary(state: Option<ContainerSummaryStateEnum>) -> SessionStatus {
    match state {
        Some(ContainerSummaryStateEnum::CREATED) => SessionStatus::Created,
        Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING) => SessionStatus::Running,
        Some(ContainerSummaryStateEnum::PAUSED) => SessionStatus::Paused,
        _ => SessionStatus::Exited,
    }
}

/// Health by the contract's rules: not running → Unknown; running without a check →
/// Healthy; otherwise the engine's status, matched by variant.
pub(crate) fn health_of(state: &ContainerState) -> SessionHealth {
    if status_of(state.status) != SessionStatus::Running {
        return SessionHealth::Unknown;
    }
    match state.health.as_ref().and_then(|h| h.status) {
        None | Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) => SessionHealth::Healthy,
        Some(HealthStatusEnum::HEALTHY) => SessionHealth::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => SessionHealth::Unhealthy,
        Some(HealthStatusEnum::STARTING) => SessionHealth::Starting,
    }
}

/// Exit info of a container that ran and ended; `None` while it runs or if it never ran.
pub(crate) fn exit_of(state: &ContainerState) -> Option<SessionExitInfo> {
    if status_of(state.status) != SessionStatus::Exited {
        return None;
    }
    let code = state.exit_code?;
    let finished_at = state.finished_at.as_deref().and_then(parse_engine_time);
    let oom_killed = state.oom_killed.unwrap_or(false);
    Some(SessionExitInfo {
        exit_code: Some(code),
        oom_killed,
        signal: SessionExitInfo::signal_from_code(code),
        error: state.error.clone().filter(|e| !e.is_empty()),
        finished_at,
    })
}

/// The state of one container from its inspection.
pub(crate) fn state_of(session: &str, inspect: &ContainerInspectResponse) -> SessionState {
    let state = inspect.state.clone().unwrap_or_default();
    let labels: BTreeMap<String, String> =
        inspect.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default().into_iter().collect();
    SessionState {
        session: session.to_owned(),
        id: inspect.id.clone().unwrap_or_default(),
        status: status_of(state.status),
        health: health_of(&state),
        exit: exit_of(&state),
        created_at: inspect.created,
        labels,
    }
}

/// The session name of a listed container (its first name without the leading slash).
pub(crate) fn summary_name(summary: &ContainerSummary) -> Option<String> {
    summary.names.as_ref()?.first().map(|n| n.trim_start_matches('/').to_owned())
}

/// Health from a listing that carries it (API 1.52 and later), by the contract's rules.
pub(crate) fn health_of_summary(summary: &ContainerSummary) -> SessionHealth {
    use bollard::models::ContainerSummaryHealthStatusEnum as H;
    match summary.health.as_ref().and_then(|h| h.status) {
        None | Some(H::NONE | H::EMPTY | H::HEALTHY) => SessionHealth::Healthy,
        Some(H::UNHEALTHY) => SessionHealth::Unhealthy,
        Some(H::STARTING) => SessionHealth::Starting,
    }
}

/// The state of a listed container; exit info is not in listings (callers ask for it).
pub(crate) fn state_of_summary(summary: &ContainerSummary, health: SessionHealth) -> Option<SessionState> {
    let status = status_of_summary(summary.state);
    Some(SessionState {
        session: summary_name(summary)?,
        id: summary.id.clone().unwrap_or_default(),
        status,
        health: if status == SessionStatus::Running { health } else { SessionHealth::Unknown },
        exit: None,
        created_at: summary.created.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok()),
        labels: summary.labels.clone().unwrap_or_default().into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use bollard::models::Health;

    use super::*;

    fn running(health: Option<HealthStatusEnum>) -> ContainerState {
        ContainerState {
            status: Some(ContainerStateStatusEnum::RUNNING),
            health: health.map(|status| Health { status: Some(status), ..Health::default() }),
            ..ContainerState::default()
        }
    }

    #[test]
    fn health_maps_by_variant_and_only_while_running() {
        assert_eq!(health_of(&running(None)), SessionHealth::Healthy, "no HEALTHCHECK reads healthy");
        assert_eq!(health_of(&running(Some(HealthStatusEnum::STARTING))), SessionHealth::Starting);
        assert_eq!(health_of(&running(Some(HealthStatusEnum::UNHEALTHY))), SessionHealth::Unhealthy);
        let stopped = ContainerState {
            status: Some(ContainerStateStatusEnum::EXITED),
            ..running(Some(HealthStatusEnum::UNHEALTHY))
        };
        assert_eq!(health_of(&stopped), SessionHealth::Unknown, "a stopped container's last probe means nothing");
    }

    #[test]
    fn exit_info_is_read_from_the_state_as_data() {
        let state = ContainerState {
            status: Some(ContainerStateStatusEnum::EXITED),
            exit_code: Some(137),
            oom_killed: Some(true),
            error: Some(String::new()),
            finished_at: Some("2026-01-02T03:04:05.5Z".into()),
            ..ContainerState::default()
        };
        let exit = exit_of(&state).expect("exited");
        assert_eq!(exit.exit_code, Some(137));
        assert!(exit.oom_killed);
        assert_eq!(exit.signal, Some(9));
        assert_eq!(exit.error, None, "an empty engine error is no error");
        assert!(exit.finished_at.is_some());
        assert_eq!(exit_of(&running(None)), None);
    }

    #[test]
    fn the_container_is_hardened_and_labelled() {
        let owner = OwnershipLabels::new("agentd", "i1").expect("labels");
        let spec = backend_core::conformance::full_spec();
        let body = create_body(&spec, &owner, network_plan(NetworkPolicy::Internet, "agentd-isolated"));
        let host = body.host_config.expect("host config");
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges:true".to_owned()]));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(100));
        assert_eq!(host.extra_hosts, Some(vec!["host.docker.internal:host-gateway".to_owned()]));
        assert_eq!(host.mounts.as_ref().map(Vec::len), Some(2));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]), "exactly the spec's environment");
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
        assert_eq!(body.stop_timeout, Some(3), "grace rounds up to whole seconds");
        let labels = body.labels.expect("labels");
        assert!(owner.owns(&labels.into_iter().collect()));
        let check = body.healthcheck.expect("healthcheck");
        assert_eq!(check.test, Some(vec!["CMD".into(), "/agent".into(), "--health".into()]));
        assert_eq!(check.start_period, None, "Docker 20.10 rejects a zero start period");
    }

    #[test]
    fn listing_health_maps_by_variant() {
        use bollard::models::{ContainerSummaryHealth, ContainerSummaryHealthStatusEnum as H};
        let with = |status| ContainerSummary {
            health: Some(ContainerSummaryHealth { status: Some(status), failing_streak: None }),
            ..ContainerSummary::default()
        };
        assert_eq!(health_of_summary(&with(H::NONE)), SessionHealth::Healthy, "no HEALTHCHECK reads healthy");
        assert_eq!(health_of_summary(&with(H::STARTING)), SessionHealth::Starting);
        assert_eq!(health_of_summary(&with(H::UNHEALTHY)), SessionHealth::Unhealthy);
        assert_eq!(health_of_summary(&with(H::HEALTHY)), SessionHealth::Healthy);
    }

    #[test]
    fn network_policies_pick_the_network() {
        assert_eq!(network_plan(NetworkPolicy::Isolated, "iso").mode, "iso");
        assert_eq!(network_plan(NetworkPolicy::None, "iso").mode, "none");
        assert_eq!(network_plan(NetworkPolicy::Host, "iso").mode, "host");
    }
}
