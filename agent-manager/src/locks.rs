//! Per-agent locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::manager::lock;

type Entries = Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>;

/// One async lock per agent id, created on first use.
///
/// # Lifetime rule
/// An agent's entry exists exactly while someone holds its lock or waits for it. Every
/// holder and every waiter keeps a reference to the entry; whoever lets go of the last
/// one (a guard dropped, a wait cancelled, a `try_lock` refused) removes it, under the
/// map's mutex. So:
/// - two holders of one agent's lock never coexist: a newcomer always finds the entry
///   that the current holder and the waiters share, never a fresh one beside it;
/// - nothing has to remove entries by hand (removing an agent, for one), and locking an
///   agent that is gone leaves nothing behind: the map holds only the locks in use.
#[derive(Debug, Default)]
pub(crate) struct AgentLocks {
    entries: Entries,
}

/// A held agent lock; dropping it releases the lock (and the entry, if it was the last
/// user).
#[derive(Debug)]
pub(crate) struct AgentGuard {
    // Dropped before `_entry`: the lock is released before the entry is looked at.
    _guard: OwnedMutexGuard<()>,
    _entry: EntryRef,
}

/// A reference to an agent's entry that removes the entry when it is the last one.
#[derive(Debug)]
struct EntryRef {
    entries: Entries,
    id: String,
    mutex: Option<Arc<AsyncMutex<()>>>,
}

impl Drop for EntryRef {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        // Released under the map's mutex, where every new reference is taken: the count
        // seen below is exact.
        drop(self.mutex.take());
        if entries.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            entries.remove(&self.id);
        }
    }
}

impl AgentLocks {
    /// A reference to the agent's entry (created if needed), and its mutex.
    fn entry(&self, id: &str) -> (EntryRef, Arc<AsyncMutex<()>>) {
        let mutex = lock(&self.entries).entry(id.to_owned()).or_default().clone();
        let entry = EntryRef { entries: self.entries.clone(), id: id.to_owned(), mutex: Some(mutex.clone()) };
        (entry, mutex)
    }

    /// Waits for the agent's lock.
    pub(crate) async fn lock(&self, id: &str) -> AgentGuard {
        let (entry, mutex) = self.entry(id);
        // Cancelled here, `entry` is dropped and cleans up.
        let guard = mutex.lock_owned().await;
        AgentGuard { _guard: guard, _entry: entry }
    }

    /// The agent's lock, if nobody holds it.
    pub(crate) fn try_lock(&self, id: &str) -> Option<AgentGuard> {
        let (entry, mutex) = self.entry(id);
        let guard = mutex.try_lock_owned().ok()?;
        Some(AgentGuard { _guard: guard, _entry: entry })
    }

    /// How many agents' locks are held or waited for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn entries_live_exactly_while_a_lock_is_held_or_awaited() {
        let locks = Arc::new(AgentLocks::default());
        assert!(locks.try_lock("gone").is_some());
        assert_eq!(locks.len(), 0, "a try_lock of an unused agent leaves nothing behind");

        let held = locks.lock("a").await;
        assert!(locks.try_lock("a").is_none(), "held");
        assert_eq!(locks.len(), 1, "a refused try_lock keeps the holder's entry, and adds none");
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _guard = locks.lock("a").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        // The waiter holds the lock now: a newcomer must find that same lock.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(locks.try_lock("a").is_none(), "a newcomer got a second lock beside the waiter's");
        waiter.await.expect("waiter");
        assert_eq!(locks.len(), 0);

        // A cancelled wait cleans up too.
        let held = locks.lock("b").await;
        let cancelled = tokio::time::timeout(Duration::from_millis(20), locks.lock("b")).await;
        assert!(cancelled.is_err());
        drop(held);
        assert_eq!(locks.len(), 0, "a cancelled wait left its entry behind");
    }

    /// `remove` once dropped its guard and then deleted the map entry: an operation that
    /// was waiting got the old lock while the next caller made a new one beside it.
    #[tokio::test]
    async fn removing_an_agent_while_an_operation_waits_leaves_one_lock() {
        use backend_core::{ExecutionBackend, OwnershipLabels};
        use backend_mock::{MockBackend, MockCall, MockEngine, PLAIN_IMAGE};

        let engine = MockEngine::new();
        let store = crate::Store::in_memory().await.expect("store");
        let owner = OwnershipLabels::new("agentd", "locks-test").expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner));
        let mut config = crate::ManagerConfig::default();
        config.defaults.kind = crate::AgentKind::Image;
        config.defaults.image = PLAIN_IMAGE.into();
        let manager = Arc::new(crate::AgentManager::new(backend, store, config));
        // An agent that ignores SIGTERM: `remove` holds its lock through the 1 s grace.
        let new = crate::NewAgent {
            name: "gone".into(),
            env: [("ECHO_IGNORE_SIGTERM".to_owned(), "1".to_owned())].into(),
            stop_grace_secs: Some(1),
            ..Default::default()
        };
        let agent = manager.spawn(new).await.expect("spawn");
        let (id, session) = (agent.agent.id.clone(), agent.agent.session.clone());
        // While `remove` waits out the grace, an operation waits for the agent's lock.
        let removal = {
            let manager = manager.clone();
            tokio::spawn(async move { manager.remove("gone").await })
        };
        let stop = MockCall::Stop(session.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !engine.calls().contains(&stop) {
            assert!(tokio::time::Instant::now() < deadline, "the removal never began its stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (acquired_tx, acquired_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let manager = manager.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let _guard = manager.lock_agent(&id).await;
                let _ = acquired_tx.send(());
                let _ = release_rx.await;
            })
        };
        removal.await.expect("join").expect("remove");
        tokio::time::timeout(Duration::from_secs(5), acquired_rx)
            .await
            .expect("the waiter gets the lock")
            .expect("sent");
        assert!(manager.try_lock_agent(&id).is_none(), "a second lock of the removed agent was handed out");
        let _ = release_tx.send(());
        waiter.await.expect("waiter");
        assert!(manager.try_lock_agent(&id).is_some());
        assert_eq!(manager.locks.len(), 0, "the lock map keeps entries of a removed agent");
    }
}
