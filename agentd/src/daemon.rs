//! `agentd serve`: wiring the store, the backend, the manager and the servers, and the
//! graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentManager, GatewayEndpoints, ShutdownSummary, Store};
use anyhow::{bail, Context, Result};
use backend_core::{ExecutionBackend, OwnershipLabels};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::api::{router, App};
use crate::config::{Config, LogFormat};

/// Sets up logging: `RUST_LOG` if set, else `log.level`; `pretty` or `json`.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::EnvFilter>().ok())
        .or_else(|| config.log.level.parse().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    /// The egress proxy's listeners, one per gateway address.
    egress: Vec<TcpListener>,
    shutdown: watch::Sender<bool>,
    leave_running: bool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("api", &self.api.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Daemon {
    /// Binds the API on `server.listen` and builds the manager.
    pub async fn bind(
        config: &Config,
        backend: Arc<dyn ExecutionBackend>,
        store: Store,
        instance: String,
    ) -> Result<Self> {
        let listen = config.server.listen;
        let api = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on server.listen = {listen} (is another agentd running?)"))?;
        let addresses =
            backend.gateway_addresses().await.context("asking the engine for its networks' gateway addresses")?;
        let endpoints =
            GatewayEndpoints { addresses, model_port: config.gateway.port, proxy_port: config.gateway.proxy_port };
        let egress = crate::egress::bind(&endpoints)?;
        let mut manager_config = config.manager_config();
        manager_config.gateway = Some(endpoints);
        let manager = Arc::new(AgentManager::new(backend, store, manager_config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = Arc::new(App { manager, token: config.token(), instance, shutdown: shutdown_rx });
        Ok(Self { app, api, egress, shutdown, leave_running: config.shutdown.leave_running })
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
        let Daemon { app, api, egress, shutdown, leave_running } = self;
        let mut servers = JoinSet::new();
        let api_addr = api.local_addr()?;
        info!(address = %api_addr, "Serving the API.");
        let mut shutdown_rx = shutdown.subscribe();
        let api_server = axum::serve(api, router(app.clone())).with_graceful_shutdown(async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        });
        servers.spawn(async move { api_server.await });
        if let Some(endpoints) = app.manager.config().gateway {
            let proxy = Arc::new(crate::egress::EgressProxy::new(app.manager.clone(), api_addr, &endpoints));
            crate::egress::serve(egress, proxy, &shutdown.subscribe(), &mut servers);
        }
        let (stop_supervisor, supervisor_rx) = watch::channel(false);
        let mut supervisor = tokio::spawn(app.manager.clone().supervise(supervisor_rx));
        info!(backend = app.manager.backend().name(), instance = %app.instance, "agentd is running.");

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
            let _ = shutdown.send(true);
            let _ = app.manager.shutdown_all(true).await;
            servers.abort_all();
            app.manager.store().close().await;
            bail!("the supervision loop {how}; agents were left running for the next start to adopt");
        }
        info!(leave_running, "Shutting down: no new requests; stopping the supervisor.");
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
        app.manager.store().close().await;
        Ok(summary)
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
    let path = config.store_path();
    let store = Store::open(&path).await.with_context(|| format!("opening the database {}", path.display()))?;
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
