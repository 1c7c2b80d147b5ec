//! The store: one read path (memory) for operations and passes, and its migrations.

mod common;

use std::borrow::Cow;

use agent_manager::{AgentKind, AgentStatus, NewAgent, RestartPolicy, Store};
use common::Fixture;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::Row;

/// A database file of its own, removed at the end.
struct TempDb(std::path::PathBuf);

impl TempDb {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-store-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    fn path(&self) -> std::path::PathBuf {
        self.0.join("agentd.db")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_database_of_the_previous_schema_is_migrated_and_its_agents_keep_their_spec() {
    let db = TempDb::new();
    // The schema as 0002 left it: kind, image and restart_policy copied out of the spec.
    {
        let options = SqliteConnectOptions::new().filename(db.path()).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("open");
        let mut migrator = sqlx::migrate!("./migrations");
        let landed: Vec<_> = migrator.migrations.iter().filter(|m| m.version <= 2).cloned().collect();
        assert_eq!(landed.len(), 2, "0001 and 0002 have landed");
        migrator.migrations = Cow::Owned(landed);
        migrator.run(&pool).await.expect("migrate to 0002");
        let spec = serde_json::json!({
            "kind": "claude-code", "image": "agentd-claude:latest", "command": null, "env": {},
            "workdir": null, "memory_mb": 2048, "cpus": 2.0, "pids_limit": 512, "network": "internet",
            "restart": "on-failure", "on_unhealthy": "record", "stop_grace_secs": 10, "model": null,
            "prompt": null, "user": null, "read_only_rootfs": false
        });
        sqlx::query(
            "INSERT INTO agents (id, name, kind, status, desired, health, session, container_id, image, spec, \
             restart_policy, restarts, crash_streak, next_restart_at, reason, created_at, updated_at) \
             VALUES ('a-1', 'old', 'claude-code', 'stopped', 'stopped', 'unknown', 'agentd-old-a1', NULL, \
             'agentd-claude:latest', ?, 'on-failure', 2, 0, NULL, 'stopped on request', 1000, 2000)",
        )
        .bind(spec.to_string())
        .execute(&pool)
        .await
        .expect("insert an agent of the old schema");
        pool.close().await;
    }
    let store = Store::open(&db.path()).await.expect("open and migrate");
    let agent = store.find_agent("old").expect("the agent survives the migration");
    assert_eq!(agent.spec.kind, AgentKind::ClaudeCode);
    assert_eq!(agent.spec.image, "agentd-claude:latest");
    assert_eq!(agent.spec.restart, RestartPolicy::OnFailure);
    assert_eq!((agent.status, agent.restarts), (AgentStatus::Stopped, 2));
    assert!(agent.speaks_stream_json());
    // The copies are gone from the table: the spec is the one place they live.
    let options = SqliteConnectOptions::new().filename(db.path());
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("open");
    let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('agents')")
        .fetch_all(&pool)
        .await
        .expect("columns")
        .iter()
        .map(|row| row.get("name"))
        .collect();
    for gone in ["kind", "image", "restart_policy"] {
        assert!(!columns.iter().any(|c| c == gone), "column {gone} is still there: {columns:?}");
    }
    assert!(columns.iter().any(|c| c == "spec"), "{columns:?}");
    pool.close().await;
    store.close().await;
}

#[tokio::test]
async fn operations_read_agents_from_memory_by_id_name_and_session() {
    let fx = Fixture::new().await;
    let spawned = fx.spawn("alpha").await.agent;
    fx.manager.remove("alpha").await.expect("remove");
    // A new agent may take a removed agent's name: the name leads to it, not the old one.
    let alpha = fx.spawn("alpha").await.agent;
    assert_ne!(alpha.id, spawned.id);
    assert!(fx.store.find_agent(&spawned.id).is_none(), "the removed agent is gone from memory");
    assert!(fx.store.find_agent_by_session(&spawned.session).is_none());
    fx.spawn_with(NewAgent { name: "beta".into(), ..NewAgent::default() }).await;
    // With the database gone, reads still answer: they never went to it.
    fx.store.close().await;
    assert_eq!(fx.manager.agent("alpha").await.expect("by name").id, alpha.id);
    assert_eq!(fx.manager.agent(&alpha.id).await.expect("by id").name, "alpha");
    assert_eq!(fx.store.find_agent_by_session(&alpha.session).map(|a| a.id), Some(alpha.id.clone()));
    assert!(fx.manager.agent("nobody").await.is_err());
    let counts = fx.manager.agent_counts();
    assert_eq!(counts.by_status.iter().find(|(s, _)| *s == AgentStatus::Running).map(|(_, n)| *n), Some(2));
    assert_eq!(counts.connected, 0);
}
