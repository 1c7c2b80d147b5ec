//! One daemon's view of a [`MockEngine`].

use std::time::Duration;

use async_trait::async_trait;
use backend_core::{
    BackendError, Capabilities, CommandOutput, EventReceiver, ExecutionBackend, OutputCursor, OutputLines,
    OwnershipLabels, Result, SessionAttach, SessionExitInfo, SessionHealth, SessionSpec, SessionState, SessionStatus,
};

use crate::engine::{MockCall, MockEngine};
use crate::output;

/// An [`ExecutionBackend`] on a [`MockEngine`], owning what carries its
/// [`OwnershipLabels`]. Clones share the engine.
#[derive(Debug, Clone)]
pub struct MockBackend {
    engine: MockEngine,
    owner: OwnershipLabels,
}

impl MockBackend {
    /// A backend with `owner` on `engine`.
    pub fn new(engine: MockEngine, owner: OwnershipLabels) -> Self {
        Self { engine, owner }
    }

    /// The engine, for scripting.
    pub fn engine(&self) -> &MockEngine {
        &self.engine
    }
}

#[async_trait]
impl ExecutionBackend for MockBackend {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn ownership(&self) -> &OwnershipLabels {
        &self.owner
    }

    fn capabilities(&self) -> Capabilities {
        self.engine.capabilities()
    }

    async fn isolated_network(&self) -> Result<Option<backend_core::IsolatedNetwork>> {
        Ok(self.engine.isolated_network())
    }

    async fn session_addresses(&self, session: &str) -> Result<Vec<std::net::IpAddr>> {
        self.engine.enter(MockCall::Addresses(session.to_owned())).await?;
        self.engine.addresses(&self.owner, session)
    }

    async fn engine_cpus(&self) -> Result<Option<u32>> {
        Ok(self.engine.cpus())
    }

    async fn image_exists(&self, image: &str) -> Result<bool> {
        self.engine.enter(MockCall::ImageExists(image.to_owned())).await?;
        Ok(self.engine.image_exists(image))
    }

    async fn image_user(&self, image: &str) -> Result<Option<String>> {
        self.engine.enter(MockCall::ImageUser(image.to_owned())).await?;
        self.engine.image_user(image)
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<String> {
        self.owner.validate_spec(spec)?;
        self.engine.enter(MockCall::Create(spec.session.clone())).await?;
        let mut labels = spec.labels.clone();
        labels.extend(self.owner.labels_for(&spec.session, &spec.agent_id));
        let id = self.engine.create(spec, labels, &self.owner)?;
        if !self.engine.capabilities().two_phase_start {
            self.engine.start(&spec.session)?;
        }
        Ok(id)
    }

    async fn start_session(&self, session: &str) -> Result<()> {
        self.engine.enter(MockCall::Start(session.to_owned())).await?;
        self.engine.is_running(&self.owner, session)?;
        self.engine.start(session)
    }

    async fn session_exists(&self, session: &str) -> Result<bool> {
        self.engine.enter(MockCall::Exists(session.to_owned())).await?;
        Ok(self.engine.owned_state(&self.owner, session).status != SessionStatus::Missing)
    }

    async fn stop_session(&self, session: &str, grace: Duration) -> Result<()> {
        self.engine.enter(MockCall::Stop(session.to_owned())).await?;
        self.engine.is_running(&self.owner, session)?;
        self.engine.stop(session, grace).await?;
        if !self.engine.capabilities().exit_info_after_stop {
            self.engine.remove(session);
        }
        Ok(())
    }

    async fn list_volumes(&self) -> Result<Vec<backend_core::VolumeState>> {
        self.engine.enter(MockCall::Volumes).await?;
        Ok(self.engine.volumes(&self.owner))
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        self.engine.enter(MockCall::RemoveVolume(name.to_owned())).await?;
        self.engine.remove_volume(&self.owner, name)
    }

    async fn remove_session(&self, session: &str) -> Result<()> {
        self.engine.enter(MockCall::Remove(session.to_owned())).await?;
        if self.engine.owned_state(&self.owner, session).status != SessionStatus::Missing {
            self.engine.remove(session);
        }
        Ok(())
    }

    async fn send_command(&self, session: &str, command: &[String]) -> Result<CommandOutput> {
        self.engine.enter(MockCall::Exec(session.to_owned())).await?;
        if !self.engine.is_running(&self.owner, session)? {
            return Err(BackendError::engine("mock", format!("session {session} is not running")));
        }
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        Ok(match args.as_slice() {
            ["/agent", "--version"] => CommandOutput { exit_code: Some(0), output: "echo-agent 0.1.0 (mock)\n".into() },
            ["/agent", "--health"] => {
                let healthy = self.engine.owned_state(&self.owner, session).health != SessionHealth::Unhealthy;
                CommandOutput { exit_code: Some(if healthy { 0 } else { 1 }), output: String::new() }
            }
            _ => {
                CommandOutput { exit_code: Some(127), output: format!("{}: not found\n", args.first().unwrap_or(&"")) }
            }
        })
    }

    async fn snapshot(&self) -> Result<Vec<SessionState>> {
        self.engine.enter(MockCall::Snapshot).await?;
        Ok(self.engine.snapshot(&self.owner))
    }

    async fn session_state(&self, session: &str) -> Result<SessionState> {
        self.engine.enter(MockCall::State(session.to_owned())).await?;
        Ok(self.engine.owned_state(&self.owner, session))
    }

    async fn session_health(&self, session: &str) -> Result<SessionHealth> {
        self.engine.enter(MockCall::Health(session.to_owned())).await?;
        Ok(self.engine.owned_state(&self.owner, session).health)
    }

    async fn session_exit_info(&self, session: &str) -> Result<Option<SessionExitInfo>> {
        self.engine.enter(MockCall::ExitInfo(session.to_owned())).await?;
        Ok(self.engine.owned_state(&self.owner, session).exit)
    }

    async fn session_logs(&self, session: &str, tail: Option<usize>) -> Result<String> {
        self.engine.enter(MockCall::Logs(session.to_owned())).await?;
        self.engine.logs(&self.owner, session, tail)
    }

    async fn attach_session(&self, session: &str, from: Option<OutputCursor>) -> Result<SessionAttach> {
        self.engine.enter(MockCall::Attach(session.to_owned())).await?;
        let (input, log) = self.engine.attach(&self.owner, session)?;
        let output = output::lines(&log, from, true, Some(input.epoch));
        Ok(SessionAttach { input: Box::new(input), output })
    }

    async fn session_output(&self, session: &str, from: Option<OutputCursor>, follow: bool) -> Result<OutputLines> {
        self.engine.enter(MockCall::Output(session.to_owned())).await?;
        let log = self.engine.output(&self.owner, session)?;
        Ok(output::lines(&log, from, follow, None))
    }

    async fn subscribe_events(&self) -> Result<Option<EventReceiver>> {
        self.engine.enter(MockCall::Subscribe).await?;
        Ok(Some(self.engine.subscribe(&self.owner)))
    }
}
