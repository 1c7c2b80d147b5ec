//! How the manager learns whether an agent is connected to the agent channel.

/// Implemented by the daemon's WebSocket registry.
pub trait AgentChannel: Send + Sync {
    /// Whether the agent with this id holds an open channel connection now.
    fn is_connected(&self, agent_id: &str) -> bool;
}

/// A channel nobody ever connects to.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoChannel;

impl AgentChannel for NoChannel {
    fn is_connected(&self, _agent_id: &str) -> bool {
        false
    }
}
