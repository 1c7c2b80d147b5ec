//! Mapping between backend-core's types and libpod's.
//!
//! Containers are created from a libpod SpecGenerator document built here (field names as
//! libpod 4.3 reads them; see `raw.rs` for why not podman-api's builder); listings and
//! inspections are read from podman-api's models.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use backend_core::{
    parse_engine_time, HealthCheckSpec, NetworkPolicy, OwnershipLabels, SessionExitInfo, SessionHealth, SessionSpec,
    SessionState, SessionStatus,
};
use podman_api::models::{InspectContainerData, InspectContainerState, ListContainer, Schema2HealthConfig};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

/// The name of Podman's default bridge network.
pub(crate) const DEFAULT_NETWORK: &str = "podman";

/// The signal `stop` sends first.
const SIGTERM: i64 = 15;

/// The session's output is kept in a k8s-file log of at most this size: a guard against
/// runaway output only, far above what a session writes. Podman 4.3 does not rotate a
/// k8s-file log: at the limit conmon replaces it with an empty file, so the output written
/// before is gone, and a reader following the log while it is replaced loses and tears
/// entries (measured). A 10 MiB limit (what the Docker backend's json-file log first
/// rotated at) is reached by one 5 MB line echoed back.
const LOG_SIZE_MAX: i64 = 1024 * 1024 * 1024;

/// Where a session's network policy puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetworkPlan {
    /// libpod's network namespace mode (`bridge`, `none`, `host`).
    pub nsmode: &'static str,
    /// The network to join in `bridge` mode.
    pub network: Option<String>,
    /// Extra `/etc/hosts` entries (`name:ip`).
    pub hosts: Vec<String>,
}

/// Where the network policy puts a container. `isolated_network` is the internal network
/// agentd created for isolated sessions; the gateways are the host's addresses on the
/// default and the isolated network, published as `host.docker.internal` (Podman itself
/// adds `host.containers.internal`).
pub(crate) fn network_plan(
    policy: NetworkPolicy,
    isolated_network: &str,
    bridge_gateway: Option<IpAddr>,
    isolated_gateway: Option<IpAddr>,
) -> NetworkPlan {
    let host_alias =
        |gateway: Option<IpAddr>| gateway.map(|ip| format!("host.docker.internal:{ip}")).into_iter().collect();
    match policy {
        NetworkPolicy::Internet => NetworkPlan {
            nsmode: "bridge",
            network: Some(DEFAULT_NETWORK.to_owned()),
            hosts: host_alias(bridge_gateway),
        },
        NetworkPolicy::Isolated => NetworkPlan {
            nsmode: "bridge",
            network: Some(isolated_network.to_owned()),
            hosts: host_alias(isolated_gateway),
        },
        NetworkPolicy::None => NetworkPlan { nsmode: "none", network: None, hosts: Vec::new() },
        NetworkPolicy::Host => NetworkPlan { nsmode: "host", network: None, hosts: Vec::new() },
    }
}

/// A grace period in whole seconds, rounded up (libpod counts seconds).
pub(crate) fn grace_secs(grace: Duration) -> u64 {
    grace.as_secs() + u64::from(grace.subsec_nanos() > 0)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The libpod SpecGenerator for `spec`: the agent as main process, ownership labels,
/// limits and hardening (all capabilities dropped, no-new-privileges, memory with swap
/// equal to memory, CPU quota, pids limit, optional read-only root with a `/tmp` tmpfs).
///
/// No ulimits are passed: containers.conf's `default_ulimits` apply, and any explicit
/// ulimit would replace all of them.
pub(crate) fn create_body(spec: &SessionSpec, owner: &OwnershipLabels, plan: &NetworkPlan) -> Value {
    let mut labels: BTreeMap<String, String> = spec.labels.clone();
    labels.extend(owner.labels_for(&spec.session, &spec.agent_id));

    let mut mounts = Vec::new();
    if let Some(dir) = &spec.workdir {
        mounts.push(bind(&dir.to_string_lossy(), "/workspace", false));
    }
    for m in &spec.mounts {
        mounts.push(bind(&m.source.to_string_lossy(), &m.target.to_string_lossy(), m.read_only));
    }
    if spec.read_only_rootfs {
        mounts.push(json!({
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["rw", "noexec", "nosuid", "size=64m"],
        }));
    }

    let mut resources = Map::new();
    if let Some(memory) = spec.resources.memory_bytes {
        let memory = i64::try_from(memory).unwrap_or(i64::MAX);
        // Swap limited to the memory limit: no swap, so an overrun is an OOM kill.
        resources.insert("memory".into(), json!({ "limit": memory, "swap": memory }));
    }
    if let Some(cpus) = spec.resources.cpus {
        let period: u64 = 100_000;
        let quota = (cpus * period as f64).round() as i64;
        resources.insert("cpu".into(), json!({ "quota": quota.max(1000), "period": period }));
    }
    if let Some(pids) = spec.resources.pids_limit {
        resources.insert("pids".into(), json!({ "limit": pids }));
    }

    let mut body = json!({
        "name": spec.session,
        "image": spec.image,
        "labels": labels,
        "env": spec.env,
        "cap_drop": ["ALL"],
        "no_new_privileges": true,
        "read_only_filesystem": spec.read_only_rootfs,
        "mounts": mounts,
        "stop_signal": SIGTERM,
        "stop_timeout": grace_secs(spec.stop_grace),
        "netns": { "nsmode": plan.nsmode },
        "log_configuration": { "driver": "k8s-file", "size": LOG_SIZE_MAX },
        "stdin": spec.stdin_open,
        "terminal": false,
    });
    let fields = body.as_object_mut().expect("a JSON object literal");
    if !resources.is_empty() {
        fields.insert("resource_limits".into(), Value::Object(resources));
    }
    if !spec.volumes.is_empty() {
        let volumes: Vec<Value> =
            spec.volumes.iter().map(|v| json!({ "Name": v.name, "Dest": v.target.to_string_lossy() })).collect();
        fields.insert("volumes".into(), Value::Array(volumes));
    }
    if let Some(entrypoint) = &spec.entrypoint {
        fields.insert("entrypoint".into(), json!(entrypoint));
    }
    if let Some(command) = &spec.command {
        fields.insert("command".into(), json!(command));
    }
    if let Some(user) = &spec.user {
        fields.insert("user".into(), json!(user));
    }
    if spec.workdir.is_some() {
        fields.insert("work_dir".into(), json!("/workspace"));
    }
    if let Some(network) = &plan.network {
        fields.insert("Networks".into(), json!({ network.as_str(): {} }));
    }
    if !plan.hosts.is_empty() {
        fields.insert("hostadd".into(), json!(plan.hosts));
    }
    if let Some(check) = health_config(&spec.health_check) {
        fields.insert("healthconfig".into(), check);
    }
    body
}

fn bind(source: &str, target: &str, read_only: bool) -> Value {
    json!({
        "destination": target,
        "source": source,
        "type": "bind",
        "options": ["rbind", if read_only { "ro" } else { "rw" }],
    })
}

fn health_config(spec: &HealthCheckSpec) -> Option<Value> {
    match spec {
        HealthCheckSpec::Image => None,
        HealthCheckSpec::Disabled => Some(json!({ "Test": ["NONE"] })),
        HealthCheckSpec::Override(check) => Some(json!({
            "Test": std::iter::once("CMD".to_owned()).chain(check.command.iter().cloned()).collect::<Vec<_>>(),
            "Interval": nanos(check.interval),
            "Timeout": nanos(check.timeout),
            "Retries": check.retries,
            "StartPeriod": nanos(check.start_period),
        })),
    }
}

/// A container's configured health check, as the backend's check driver needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckTiming {
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

/// libpod's defaults for fields a health check leaves out (those of `podman run`).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;

/// The timing of a configured check; `None` when the container has no health check.
pub(crate) fn check_timing(config: Option<&Schema2HealthConfig>) -> Option<CheckTiming> {
    let config = config?;
    let test = config.test.as_deref().unwrap_or_default();
    if test.is_empty() || test[0] == "NONE" {
        return None;
    }
    let duration = |ns: Option<i64>, default: Duration| match ns {
        Some(ns) if ns > 0 => Duration::from_nanos(ns.unsigned_abs()),
        _ => default,
    };
    Some(CheckTiming {
        interval: duration(config.interval, DEFAULT_INTERVAL),
        timeout: duration(config.timeout, DEFAULT_TIMEOUT),
        retries: config.retries.and_then(|r| u32::try_from(r).ok()).filter(|r| *r > 0).unwrap_or(DEFAULT_RETRIES),
        start_period: duration(config.start_period, Duration::ZERO),
    })
}

/// A libpod container state (`configured`, `created`, `initialized`, `running`,
/// `paused`, `stopping`, `stopped`, `exited`, `removing`, ...) as a session status.
pub(crate) fn status_of(state: &str) -> SessionStatus {
    match state.to_ascii_lowercase().as_str() {
        "configured" | "created" | "initialized" => SessionStatus::Created,
        "running" | "stopping" | "restarting" => SessionStatus::Running,
        "paused" => SessionStatus::Paused,
        _ => SessionStatus::Exited,
    }
}

/// Health by the contract's rules: not running → Unknown; running without a check (empty
/// status) → Healthy; otherwise libpod's status. A stopped container keeps its last probe
/// result, which means nothing and is ignored.
pub(crate) fn health_of(status: SessionStatus, libpod_health: Option<&str>) -> SessionHealth {
    if status != SessionStatus::Running {
        return SessionHealth::Unknown;
    }
    match libpod_health.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" | "none" | "healthy" => SessionHealth::Healthy,
        "unhealthy" => SessionHealth::Unhealthy,
        "starting" => SessionHealth::Starting,
        _ => SessionHealth::Unknown,
    }
}

/// A timestamp from podman-api's models (chrono's, formatted by the caller with
/// `to_rfc3339`) as `time`'s, with the engine's zero time as `None`.
pub(crate) fn engine_time(rfc3339: Option<String>) -> Option<OffsetDateTime> {
    rfc3339.as_deref().and_then(parse_engine_time)
}

/// Exit info of an inspected container that ran and ended, with the engine's own OOM
/// flag; `None` while it runs or if it never ran. The backend refines `oom_killed` with
/// host evidence (see `oom.rs`).
pub(crate) fn exit_of(state: &InspectContainerState) -> Option<SessionExitInfo> {
    if status_of(state.status.as_deref().unwrap_or_default()) != SessionStatus::Exited {
        return None;
    }
    let code = i64::from(state.exit_code?);
    Some(SessionExitInfo {
        exit_code: Some(code),
        oom_killed: state.oom_killed.unwrap_or(false),
        signal: SessionExitInfo::signal_from_code(code),
        error: state.error.clone().filter(|e| !e.trim().is_empty()),
        finished_at: engine_time(state.finished_at.as_ref().map(|t| t.to_rfc3339())),
    })
}

/// The labels of an inspected container.
pub(crate) fn labels_of(inspect: &InspectContainerData) -> BTreeMap<String, String> {
    inspect.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default().into_iter().collect()
}

/// The state of one container from its inspection (exit info as the engine has it).
pub(crate) fn state_of(session: &str, inspect: &InspectContainerData) -> SessionState {
    let state = inspect.state.as_ref();
    let status = status_of(state.and_then(|s| s.status.as_deref()).unwrap_or_default());
    let health = health_of(status, state.and_then(|s| s.health.as_ref()).and_then(|h| h.status.as_deref()));
    SessionState {
        session: session.to_owned(),
        id: inspect.id.clone().unwrap_or_default(),
        status,
        health,
        exit: state.and_then(exit_of),
        created_at: engine_time(inspect.created.as_ref().map(|t| t.to_rfc3339())),
        labels: labels_of(inspect),
    }
}

/// The session name of a listed container (its first name).
pub(crate) fn summary_name(summary: &ListContainer) -> Option<String> {
    summary.names.as_ref()?.first().map(|n| n.trim_start_matches('/').to_owned())
}

/// A unix timestamp in seconds from a listing; libpod writes the zero time's (negative)
/// for "never".
pub(crate) fn unix_time(seconds: Option<i64>) -> Option<OffsetDateTime> {
    seconds.filter(|s| *s > 0).and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
}

/// The state of a listed container. libpod's listing carries the health status (in its
/// `Status` field) and the exit code, so one listing is the whole snapshot; the backend
/// refines the exit's `oom_killed`.
pub(crate) fn state_of_summary(summary: &ListContainer) -> Option<SessionState> {
    let status = status_of(summary.state.as_deref().unwrap_or_default());
    let exit = (status == SessionStatus::Exited && summary.exited.unwrap_or(true)).then(|| {
        let code = i64::from(summary.exit_code.unwrap_or_default());
        SessionExitInfo::exited(code, unix_time(summary.exited_at))
    });
    Some(SessionState {
        session: summary_name(summary)?,
        id: summary.id.clone().unwrap_or_default(),
        status,
        health: health_of(status, summary.status.as_deref()),
        exit,
        created_at: engine_time(summary.created.as_ref().map(|t| t.to_rfc3339())),
        labels: summary.labels.clone().unwrap_or_default().into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetworkPlan {
        network_plan(NetworkPolicy::Internet, "agentd-isolated", Some("10.88.0.1".parse().expect("ip")), None)
    }

    #[test]
    fn the_container_is_hardened_and_labelled() {
        let owner = OwnershipLabels::new("agentd", "i1").expect("labels");
        let spec = backend_core::conformance::full_spec();
        let body = create_body(&spec, &owner, &plan());
        assert_eq!(body["cap_drop"], json!(["ALL"]));
        assert_eq!(body["no_new_privileges"], json!(true), "libpod's spelling, not podman-api's");
        assert_eq!(body["resource_limits"]["memory"], json!({ "limit": 64 << 20, "swap": 64 << 20 }));
        assert_eq!(body["resource_limits"]["cpu"], json!({ "quota": 150_000, "period": 100_000 }));
        assert_eq!(body["resource_limits"]["pids"], json!({ "limit": 100 }));
        assert_eq!(body["env"], json!({ "A": "1" }), "exactly the spec's environment");
        assert_eq!(body["work_dir"], json!("/workspace"));
        assert_eq!(body["mounts"].as_array().map(Vec::len), Some(3), "workdir, extra mount, /tmp tmpfs");
        assert_eq!(body["mounts"][1]["options"], json!(["rbind", "ro"]));
        assert_eq!(body["read_only_filesystem"], json!(true));
        assert_eq!(body["stop_timeout"], json!(3), "grace rounds up to whole seconds");
        assert_eq!(body["stop_signal"], json!(15));
        assert_eq!(body["netns"], json!({ "nsmode": "bridge" }));
        assert_eq!(body["Networks"], json!({ "podman": {} }));
        assert_eq!(body["hostadd"], json!(["host.docker.internal:10.88.0.1"]));
        assert!(body.get("r_limits").is_none(), "containers.conf default ulimits stay in force");
        assert_eq!(body["healthconfig"]["Test"], json!(["CMD", "/agent", "--health"]));
        assert_eq!(body["healthconfig"]["Interval"], json!(1_000_000_000));
        let labels: BTreeMap<String, String> = serde_json::from_value(body["labels"].clone()).expect("labels");
        assert!(owner.owns(&labels));
    }

    #[test]
    fn defaults_leave_the_image_alone() {
        let owner = OwnershipLabels::new("agentd", "i1").expect("labels");
        let body = create_body(&SessionSpec::new("agentd-a", "id-1", "img:1"), &owner, &plan());
        for absent in ["command", "user", "work_dir", "healthconfig", "resource_limits"] {
            assert!(body.get(absent).is_none(), "{absent} must be left to the image: {body}");
        }
        let mut spec = SessionSpec::new("agentd-a", "id-1", "img:1");
        spec.health_check = HealthCheckSpec::Disabled;
        assert_eq!(create_body(&spec, &owner, &plan())["healthconfig"], json!({ "Test": ["NONE"] }));
    }

    #[test]
    fn network_policies_pick_the_namespace_and_network() {
        let gw: Option<IpAddr> = Some("10.89.0.1".parse().expect("ip"));
        let isolated = network_plan(NetworkPolicy::Isolated, "iso", None, gw);
        assert_eq!((isolated.nsmode, isolated.network.as_deref()), ("bridge", Some("iso")));
        assert_eq!(isolated.hosts, vec!["host.docker.internal:10.89.0.1".to_owned()]);
        assert_eq!(network_plan(NetworkPolicy::None, "iso", None, None).nsmode, "none");
        assert_eq!(network_plan(NetworkPolicy::Host, "iso", None, None).nsmode, "host");
        assert_eq!(network_plan(NetworkPolicy::Host, "iso", None, None).network, None);
    }

    #[test]
    fn health_maps_libpods_status_and_only_while_running() {
        assert_eq!(health_of(SessionStatus::Running, Some("")), SessionHealth::Healthy, "no check reads healthy");
        assert_eq!(health_of(SessionStatus::Running, None), SessionHealth::Healthy);
        assert_eq!(health_of(SessionStatus::Running, Some("starting")), SessionHealth::Starting);
        assert_eq!(health_of(SessionStatus::Running, Some("unhealthy")), SessionHealth::Unhealthy);
        assert_eq!(
            health_of(SessionStatus::Exited, Some("healthy")),
            SessionHealth::Unknown,
            "a stopped container's last probe means nothing"
        );
    }

    #[test]
    fn libpod_states_map_to_statuses() {
        assert_eq!(status_of("created"), SessionStatus::Created);
        assert_eq!(status_of("configured"), SessionStatus::Created);
        assert_eq!(status_of("running"), SessionStatus::Running);
        assert_eq!(status_of("paused"), SessionStatus::Paused);
        assert_eq!(status_of("stopping"), SessionStatus::Running);
        assert_eq!(status_of("exited"), SessionStatus::Exited);
        assert_eq!(status_of("stopped"), SessionStatus::Exited);
    }

    #[test]
    fn check_timing_reads_the_configured_check() {
        let config = Schema2HealthConfig {
            test: Some(vec!["CMD".into(), "/agent".into(), "--health".into()]),
            interval: Some(1_000_000_000),
            timeout: Some(3_000_000_000),
            retries: Some(2),
            start_period: None,
        };
        let timing = check_timing(Some(&config)).expect("a check");
        assert_eq!(timing.interval, Duration::from_secs(1));
        assert_eq!(timing.timeout, Duration::from_secs(3));
        assert_eq!(timing.retries, 2);
        assert_eq!(timing.start_period, Duration::ZERO);
        let none = Schema2HealthConfig { test: Some(vec!["NONE".into()]), ..config };
        assert_eq!(check_timing(Some(&none)), None);
        assert_eq!(check_timing(None), None);
    }

    #[test]
    fn listed_exits_carry_the_code_and_time() {
        let summary = ListContainer {
            auto_remove: None,
            command: None,
            created: None,
            created_at: None,
            exit_code: Some(3),
            exited: Some(true),
            exited_at: Some(1_795_891_917),
            id: Some("abc".into()),
            image: None,
            image_id: None,
            is_infra: None,
            labels: None,
            mounts: None,
            names: Some(vec!["s1".into()]),
            namespaces: None,
            networks: None,
            pid: None,
            pod: None,
            pod_name: None,
            ports: None,
            size: None,
            started_at: None,
            state: Some("exited".into()),
            status: Some("healthy".into()),
        };
        let state = state_of_summary(&summary).expect("named");
        assert_eq!(state.status, SessionStatus::Exited);
        assert_eq!(state.health, SessionHealth::Unknown);
        let exit = state.exit.expect("exit");
        assert_eq!(exit.exit_code, Some(3));
        assert!(exit.finished_at.is_some());
        assert_eq!(unix_time(Some(-62_135_596_800)), None, "libpod's zero time is never");
    }
}
