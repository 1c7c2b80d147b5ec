//! `agentd serve`: wiring the store, the backend, the manager and the servers, and the
//! graceful shutdown.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentManager, GatewayEndpoints, ShutdownSummary, Store};
use anyhow::{bail, Context, Result};
use backend_core::{ExecutionBackend, OwnershipLabels};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::api::{router, App};
use crate::config::{Config, LogFormat};
use crate::firewall::Protection;
use crate::gateway::{Credential, ModelGateway};
use crate::listen::ConnLimits;

/// Sets up logging: `RUST_LOG` if set, else `log.level`; `pretty` or `json`.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| crate::config::log_filter_names_levels(v))
        .and_then(|v| v.parse::<tracing_subscriber::EnvFilter>().ok())
        .or_else(|| config.log.level.parse().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org): log
    // files and journald get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour).with_writer(std::io::stderr);
    let outcome = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    if let Err(e) = outcome {
        eprintln!("agentd: logging was already set up: {e}");
    }
}

/// A daemon whose servers are bound and whose supervisor is not started yet.
pub struct Daemon {
    app: Arc<App>,
    api: TcpListener,
    /// The model gateway's listeners, one per gateway address (none without any).
    gateway: Vec<TcpListener>,
    model_gateway: Arc<ModelGateway>,
    api_limits: ConnLimits,
    gateway_limits: ConnLimits,
    /// The egress proxy's listeners, one per gateway address.
    egress: Vec<TcpListener>,
    shutdown: watch::Sender<bool>,
    leave_running: bool,
    protection: Protection,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gateway: Vec<_> = self.gateway.iter().filter_map(|l| l.local_addr().ok()).collect();
        f.debug_struct("Daemon")
            .field("api", &self.api.local_addr().ok())
            .field("gateway", &gateway)
            .finish_non_exhaustive()
    }
}

/// Why claude-code agents are refused while the daemon has no model credential.
const NO_CREDENTIAL: &str = "agents of kind claude-code reach the model through agentd's gateway, and agentd has no \
     model credential to give it: set model.api_key_file, or ANTHROPIC_API_KEY (an API key) or \
     CLAUDE_CODE_OAUTH_TOKEN (from `claude setup-token`) in agentd's environment, and restart agentd; \
     or spawn with --kind image to run an image without Claude Code";

impl Daemon {
    /// Binds the API on `server.listen` and builds the manager.
    pub async fn bind(
        config: &Config,
        backend: Arc<dyn ExecutionBackend>,
        store: Store,
        instance: String,
    ) -> Result<Self> {
        let listen = config.server.listen;
        let api = crate::listen::bind_api(listen)
            .with_context(|| format!("cannot listen on server.listen = {listen} (is another agentd running?)"))?;
        let addresses =
            backend.gateway_addresses().await.context("asking the engine for its networks' gateway addresses")?;
        let endpoints =
            GatewayEndpoints { addresses, model_port: config.gateway.port, proxy_port: config.gateway.proxy_port };
        let gateway = bind_gateways(&endpoints)?;
        // The host firewall that confines isolated agents, before any agent can start.
        let ports = [config.gateway.port, config.gateway.proxy_port];
        let protection = crate::firewall::protect(&config.firewall, &instance, &ports, backend.as_ref()).await;
        let egress = crate::egress::bind(&endpoints)?;
        let mut manager_config = config.manager_config();
        manager_config.gateway = Some(endpoints);
        manager_config.isolated_refusal = protection.refusal();
        manager_config.protected_paths = config.protected_paths(backend.name(), backend.engine_socket());
        let credential = Credential::from_daemon(&config.model)?;
        if credential.is_none() {
            manager_config.claude_refusal = Some(NO_CREDENTIAL.to_owned());
        }
        if let Some(cpus) = config.agents.cpus {
            match backend.engine_cpus().await {
                Ok(Some(host)) if cpus > f64::from(host) => warn!(
                    cpus,
                    engine_cpus = host,
                    "agents.cpus is above the engine host's CPUs: agents that take the default get the host's CPUs."
                ),
                _ => {}
            }
        }
        let manager: Arc<AgentManager<dyn ExecutionBackend>> =
            Arc::new(AgentManager::new(backend, store, manager_config));
        match &credential {
            Some(c) => info!(source = c.source(), kind = ?c.kind(), "Model credential loaded; it stays in agentd."),
            None if !gateway.is_empty() => warn!(
                "No model credential: the model gateway answers 503 until model.api_key_file, or ANTHROPIC_API_KEY or \
                 CLAUDE_CODE_OAUTH_TOKEN in agentd's environment, is set and agentd restarted."
            ),
            None => {}
        }
        let model_gateway = Arc::new(ModelGateway::new(manager.clone(), &config.model, credential)?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = Arc::new(App { manager, token: config.token(), instance, shutdown: shutdown_rx });
        Ok(Self {
            app,
            api,
            api_limits: config.server.limits(),
            gateway_limits: config.gateway.limits(),
            gateway,
            egress,
            model_gateway,
            shutdown,
            leave_running: config.shutdown.leave_running,
            protection,
        })
    }

    /// The bound model gateway addresses (none when the backend has no gateway address).
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        self.gateway.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// The bound API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The manager.
    pub fn manager(&self) -> Arc<AgentManager<dyn ExecutionBackend>> {
        self.app.manager.clone()
    }

    /// Serves and supervises until `stop` completes, then shuts down: stops accepting
    /// requests, ends streams and conversations, and stops every agent in parallel (or leaves
    /// them running for the next start to adopt).
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<ShutdownSummary> {
        let Daemon {
            app,
            api,
            api_limits,
            gateway_limits,
            gateway,
            egress,
            model_gateway,
            shutdown,
            leave_running,
            protection,
        } = self;
        let mut servers = JoinSet::new();
        let api_addr = api.local_addr()?;
        info!(address = %api_addr, "Serving the API.");
        let mut shutdown_rx = shutdown.subscribe();
        let api_server = crate::listen::serve(api, api_limits, router(app.clone()), async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        });
        servers.spawn(api_server);
        for listener in gateway {
            let address = listener.local_addr()?;
            info!(%address, "Serving the model gateway.");
            let mut shutdown_rx = shutdown.subscribe();
            let routes = crate::gateway::router(model_gateway.clone());
            let server = crate::listen::serve(listener, gateway_limits, routes, async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            });
            servers.spawn(server);
        }
        if let Some(endpoints) = app.manager.config().gateway {
            let proxy = Arc::new(crate::egress::EgressProxy::new(app.manager.clone(), api_addr, &endpoints));
            crate::egress::serve(egress, proxy, gateway_limits, &shutdown.subscribe(), &mut servers);
        }
        let (stop_supervisor, supervisor_rx) = watch::channel(false);
        let mut supervisor = tokio::spawn(app.manager.clone().supervise(supervisor_rx));
        info!(backend = app.manager.backend().name(), instance = %app.instance, "agentd is running.");
        // The API serves (its listener is bound and its server task runs): tell systemd
        // (`Type=notify`, contrib/agentd.service). Without NOTIFY_SOCKET this does nothing.
        notify_systemd(sd_notify::NotifyState::Ready, "READY=1");

        // A supervisor that dies takes the daemon with it: an API over a dead supervision
        // loop would serve stale truth. The agents are left running for the next start
        // (which a service manager brings) to adopt.
        let died = tokio::select! {
            _ = stop => None,
            outcome = &mut supervisor => Some(outcome),
        };
        if let Some(outcome) = died {
            let how = match &outcome {
                Err(e) if e.is_panic() => "panicked",
                _ => "ended unexpectedly",
            };
            error!(
                how,
                "The supervision loop {how}; agentd stops, leaving its agents running for the next start to adopt."
            );
            notify_systemd(sd_notify::NotifyState::Stopping, "STOPPING=1");
            let _ = shutdown.send(true);
            let _ = app.manager.shutdown_all(true).await;
            servers.abort_all();
            app.manager.store().close().await;
            bail!("the supervision loop {how}; agents were left running for the next start to adopt");
        }
        info!(leave_running, "Shutting down: no new requests; stopping the supervisor.");
        notify_systemd(sd_notify::NotifyState::Stopping, "STOPPING=1");
        let _ = shutdown.send(true);
        let _ = stop_supervisor.send(true);
        if tokio::time::timeout(Duration::from_secs(30), supervisor).await.is_err() {
            warn!("The supervisor did not stop within 30 s; shutting down anyway.");
        }
        let summary = app.manager.shutdown_all(leave_running).await?;
        info!(
            stopped = summary.stopped.len(),
            left_running = summary.left_running.len(),
            failed = summary.failed.len(),
            containers_removed = summary.removed.len(),
            "Agents handled."
        );
        if let Protection::Installed(firewall, installed) = &protection {
            if leave_running {
                info!(chain = %installed.input_chain(), "The host firewall rules stay: they protect the agents left running.");
            } else if !summary.failed.is_empty() {
                warn!(
                    chain = %installed.input_chain(),
                    "The host firewall rules stay: some agents could not be stopped and may still run."
                );
            } else {
                match firewall.remove(installed).await {
                    Ok(()) => {
                        info!(interface = %installed.interface, tag = firewall.tag(), "Host firewall rules removed.")
                    }
                    Err(e) => warn!(
                        error = %format!("{e:#}"),
                        tag = firewall.tag(),
                        "The host firewall rules could not be removed; see docs/security.md to delete them by hand."
                    ),
                }
            }
        }
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(outcome) = servers.join_next().await {
                if let Ok(Err(e)) = outcome {
                    error!(error = %e, "A server ended with an error.");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("Servers did not drain within 5 s; closing them.");
            servers.abort_all();
        }
        // Usage records still on their way to the store.
        if tokio::time::timeout(Duration::from_secs(5), model_gateway.meter().flush()).await.is_err() {
            warn!("Model usage records were not all stored within 5 s.");
        }
        app.manager.store().close().await;
        Ok(summary)
    }
}

/// Binds the model gateway on every gateway address (internet and isolated, each once) at
/// `gateway.port`; none when the backend names no address (the mock backend, a remote
/// engine).
fn bind_gateways(endpoints: &GatewayEndpoints) -> Result<Vec<TcpListener>> {
    let mut ips: Vec<IpAddr> =
        [endpoints.addresses.internet, endpoints.addresses.isolated].into_iter().flatten().collect();
    ips.sort_unstable();
    ips.dedup();
    ips.into_iter()
        .map(|ip| {
            let address = SocketAddr::new(ip, endpoints.model_port);
            crate::listen::bind_gateway(address).with_context(|| {
                format!(
                    "cannot listen on the model gateway address {address} (gateway.port = {}; containers reach \
                     agentd there): is another agentd or service using the port? Choose another gateway.port",
                    endpoints.model_port
                )
            })
        })
        .collect()
}

/// Tells the service manager (systemd, `Type=notify`) a state change, when it listens
/// (`NOTIFY_SOCKET` is set); a failure to tell it is logged, not fatal.
fn notify_systemd(state: sd_notify::NotifyState<'_>, what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(&[state]) {
        Ok(()) => debug!(state = what, "Service manager notified."),
        Err(e) => warn!(state = what, error = %e, "Cannot notify the service manager (NOTIFY_SOCKET)."),
    }
}

/// Ignores SIGHUP for the rest of the process's life, logging each one: its default
/// action would kill the daemon (a closed terminal, `systemctl reload`, a log rotator's
/// habit). agentd has no log file of its own to reopen (it logs to stderr) and reads its
/// configuration only at start, so there is nothing to reload: restart it for a new
/// configuration.
pub fn ignore_sighup() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    info!(
                        signal = "SIGHUP",
                        "Signal ignored: agentd logs to stderr and reads its configuration only at start; \
                         restart it to apply a new configuration."
                    );
                }
            });
        }
        Err(e) => warn!(error = %e, "Cannot install a SIGHUP handler; a SIGHUP will end agentd."),
    }
}

/// Waits for SIGTERM or SIGINT; a second one exits at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("Cannot install signal handlers; stop agentd with SIGKILL.");
        return std::future::pending().await;
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = which, "Signal received; shutting down gracefully (a second signal exits at once).");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("agentd: second signal: exiting now without waiting for agents");
        std::process::exit(130);
    });
}

/// `agentd serve`.
pub async fn serve(config: Config) -> Result<()> {
    ignore_sighup();
    // The connection caps, not the fd limit, bound what the listeners hold; the rest of
    // the limit is the engine calls', the store's and /healthz's.
    if let Err(e) = crate::listen::raise_fd_limit() {
        warn!(error = %e, "Cannot raise the open-file limit (RLIMIT_NOFILE); running with the one inherited.");
    }
    let path = config.store_path();
    // Held until the daemon ends: a second daemon on this database fails here.
    let _lock = crate::storefs::prepare(&path)?;
    let store = Store::open(&path).await.with_context(|| format!("opening the database {}", path.display()))?;
    crate::storefs::tighten_files(&path)?;
    let instance = match &config.instance_id {
        Some(id) => id.clone(),
        None => store.instance_id().await.context("reading the instance id")?,
    };
    info!(database = %path.display(), instance = %instance, "Store opened.");
    let owner = OwnershipLabels::new(config.agents.prefix.clone(), instance.clone())?;
    let backend = crate::backends::connect(&config, owner).await?;
    let daemon = Daemon::bind(&config, backend, store, instance).await?;
    daemon.run(shutdown_signal()).await?;
    info!("agentd stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend_core::NetworkGateways;

    fn endpoints(internet: Option<&str>, isolated: Option<&str>, port: u16) -> GatewayEndpoints {
        let ip = |s: Option<&str>| s.map(|s| s.parse().expect("ip"));
        GatewayEndpoints {
            addresses: NetworkGateways { internet: ip(internet), isolated: ip(isolated) },
            model_port: port,
            proxy_port: port.wrapping_add(1),
        }
    }

    #[tokio::test]
    async fn the_gateway_binds_each_address_once_and_nothing_without_one() {
        assert!(bind_gateways(&endpoints(None, None, 7007)).expect("nothing to bind").is_empty());
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let bound = bind_gateways(&endpoints(Some("127.0.0.1"), Some("127.0.0.1"), port)).expect("bind");
        let addrs: Vec<String> = bound.iter().map(|l| l.local_addr().expect("addr").to_string()).collect();
        assert_eq!(addrs, [format!("127.0.0.1:{port}")]);
        let both = bind_gateways(&endpoints(Some("127.0.0.2"), Some("127.0.0.3"), port)).expect("bind");
        assert_eq!(both.len(), 2);
    }

    #[tokio::test]
    async fn a_taken_gateway_port_is_a_startup_error_naming_the_address_and_the_key() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let error = bind_gateways(&endpoints(Some("127.0.0.1"), None, port)).expect_err("port in use");
        let text = format!("{error:#}");
        assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("gateway.port"), "{text}");
    }
}
