//! Prometheus text exposition of the daemon's state and counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use agent_manager::{AgentCounts, MetricsSnapshot};

/// Renders `/metrics` from the manager's counts and counters (both read from memory).
pub fn render(counts: &AgentCounts, m: &MetricsSnapshot) -> String {
    let mut out = String::new();
    let by_status: BTreeMap<&str, u64> = counts.by_status.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let by_health: BTreeMap<&str, u64> = counts.running_by_health.iter().map(|(h, n)| (h.as_str(), *n)).collect();
    let _ = writeln!(out, "# HELP agentd_agents Agents by status.\n# TYPE agentd_agents gauge");
    for (status, n) in by_status {
        let _ = writeln!(out, "agentd_agents{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP agentd_running_agents_health Running agents by health.\n# TYPE agentd_running_agents_health gauge"
    );
    for (health, n) in by_health {
        let _ = writeln!(out, "agentd_running_agents_health{{health=\"{health}\"}} {n}");
    }
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    gauge(
        &mut out,
        "agentd_connected_agents",
        "Agents whose stdin and output agentd holds attached.",
        "gauge",
        counts.connected as f64,
    );
    gauge(
        &mut out,
        "agentd_reconcile_passes_total",
        "Completed reconcile passes.",
        "counter",
        m.reconcile_passes as f64,
    );
    gauge(
        &mut out,
        "agentd_reconcile_failures_total",
        "Reconcile passes that could not complete.",
        "counter",
        m.reconcile_failures as f64,
    );
    gauge(
        &mut out,
        "agentd_reconcile_pass_duration_seconds",
        "Duration of the last completed reconcile pass.",
        "gauge",
        m.last_pass_micros as f64 / 1e6,
    );
    gauge(
        &mut out,
        "agentd_engine_errors_total",
        "Engine calls that failed because the engine was unavailable.",
        "counter",
        m.engine_errors as f64,
    );
    gauge(
        &mut out,
        "agentd_restarts_total",
        "Agent restarts, by users and restart policies.",
        "counter",
        m.restarts as f64,
    );
    gauge(
        &mut out,
        "agentd_relists_after_dropped_events_total",
        "Full relists because backend events may have been lost.",
        "counter",
        m.relists_after_resync as f64,
    );
    gauge(&mut out, "agentd_orphans_removed_total", "Orphaned sessions removed.", "counter", m.orphans_removed as f64);
    gauge(&mut out, "agentd_backend_events_total", "Backend events received.", "counter", m.events_received as f64);
    gauge(
        &mut out,
        "agentd_model_requests_total",
        "Requests through the model gateway recorded since the daemon started.",
        "counter",
        m.model_requests as f64,
    );
    gauge(
        &mut out,
        "agentd_model_input_tokens_total",
        "Input tokens of the recorded model requests.",
        "counter",
        m.model_input_tokens as f64,
    );
    gauge(
        &mut out,
        "agentd_model_output_tokens_total",
        "Output tokens of the recorded model requests.",
        "counter",
        m.model_output_tokens as f64,
    );
    gauge(
        &mut out,
        "agentd_model_requests_refused_total",
        "Model requests refused (429) under their agent's limits.",
        "counter",
        m.model_refusals as f64,
    );
    out
}

#[cfg(test)]
mod tests {
    use agent_manager::{AgentCounts, MetricsSnapshot};

    #[test]
    fn the_model_totals_are_rendered() {
        let counts = AgentCounts { by_status: Vec::new(), running_by_health: Vec::new(), connected: 0 };
        let m = MetricsSnapshot {
            model_requests: 3,
            model_input_tokens: 30,
            model_output_tokens: 15,
            model_refusals: 1,
            ..MetricsSnapshot::default()
        };
        let text = super::render(&counts, &m);
        for line in [
            "# TYPE agentd_model_requests_total counter",
            "agentd_model_requests_total 3",
            "agentd_model_input_tokens_total 30",
            "agentd_model_output_tokens_total 15",
            "agentd_model_requests_refused_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }
}
