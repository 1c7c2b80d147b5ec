//! Model requests through the gateway: records, per-agent sums in memory and in the store,
//! their life with the agent's, and the limits a spawn sets.

mod common;

use std::time::Duration;

use agent_manager::{Clock, ManagerError, ModelLimits, ModelRequest, ModelUsage, NewAgent, Store};
use backend_mock::MockEngine;
use common::{test_config, Fixture};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use time::OffsetDateTime;

/// A database file of its own, removed at the end.
struct TempDb(std::path::PathBuf);

impl TempDb {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-usage-test-{}", uuid::Uuid::new_v4().simple()));
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

fn request(agent_id: &str, at: OffsetDateTime, input: u64, output: u64) -> ModelRequest {
    ModelRequest {
        agent_id: agent_id.into(),
        at,
        model: Some("claude-stand-in".into()),
        status: 200,
        latency_ms: 12,
        input_tokens: input,
        output_tokens: output,
    }
}

fn usage(requests: u64, input_tokens: u64, output_tokens: u64) -> ModelUsage {
    ModelUsage { requests, input_tokens, output_tokens }
}

/// Rows of `table` for the agent, read from the file behind the store.
async fn rows(db: &TempDb, table: &str, agent_id: &str) -> i64 {
    let options = SqliteConnectOptions::new().filename(db.path());
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("open");
    let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE agent_id = ?"))
        .bind(agent_id)
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

#[tokio::test]
async fn requests_are_recorded_summed_and_read_back_after_a_restart() {
    let db = TempDb::new();
    let engine = MockEngine::new();
    let store = Store::open(&db.path()).await.expect("open");
    let fx = Fixture::on(engine.clone(), store, test_config(), agent_manager::ManualClock::new()).await;
    let id = fx.spawn("talker").await.agent.id;
    let now = fx.clock.now();
    fx.manager.record_model_request(&request(&id, now, 10, 5)).await.expect("record");
    fx.manager
        .record_model_requests(&[request(&id, now, 10, 5), request(&id, now - time::Duration::days(1), 7, 3)])
        .await
        .expect("record a batch");

    assert_eq!(fx.get("talker").await.model_usage, usage(3, 27, 13));
    assert_eq!(fx.manager.model_usage(&id), usage(3, 27, 13));
    assert_eq!(fx.manager.model_output_tokens_today(&id), 10, "yesterday's tokens are not today's");
    let m = fx.manager.metrics().snapshot();
    assert_eq!((m.model_requests, m.model_input_tokens, m.model_output_tokens), (3, 27, 13));
    let records = fx.manager.model_requests("talker", 10).await.expect("records");
    assert_eq!(records.len(), 3);
    assert_eq!(records[0], request(&id, now, 10, 5), "a record reads back as written");
    assert_eq!(fx.manager.model_requests("talker", 1).await.expect("last").len(), 1);

    // A new daemon on the same database: the sums and today's tokens come from the store.
    fx.store.close().await;
    let store = Store::open(&db.path()).await.expect("reopen");
    let again = Fixture::on(engine, store, test_config(), fx.clock.clone()).await;
    assert_eq!(again.get("talker").await.model_usage, usage(3, 27, 13));
    assert_eq!(again.manager.model_output_tokens_today(&id), 10);
    // The next day starts from zero, and its tokens count from there.
    again.clock.advance(Duration::from_secs(86_400));
    assert_eq!(again.manager.model_output_tokens_today(&id), 0);
    again.manager.record_model_request(&request(&id, again.clock.now(), 1, 2)).await.expect("record");
    assert_eq!(again.manager.model_output_tokens_today(&id), 2);
    assert_eq!(again.manager.model_usage(&id), usage(4, 28, 15));
    again.store.close().await;
}

#[tokio::test]
async fn removing_an_agent_deletes_its_requests_and_sums_and_a_late_record_is_dropped() {
    let db = TempDb::new();
    let store = Store::open(&db.path()).await.expect("open");
    let fx = Fixture::on(MockEngine::new(), store, test_config(), agent_manager::ManualClock::new()).await;
    let gone = fx.spawn("gone").await.agent.id;
    let kept = fx.spawn("kept").await.agent.id;
    let now = fx.clock.now();
    fx.manager.record_model_requests(&[request(&gone, now, 10, 5), request(&kept, now, 1, 1)]).await.expect("record");
    assert_eq!((rows(&db, "model_requests", &gone).await, rows(&db, "model_usage", &gone).await), (1, 1));

    fx.manager.remove("gone").await.expect("remove");
    assert_eq!(fx.manager.model_usage(&gone), ModelUsage::default());
    assert_eq!(fx.manager.model_output_tokens_today(&gone), 0);
    assert_eq!((rows(&db, "model_requests", &gone).await, rows(&db, "model_usage", &gone).await), (0, 0));

    // A request whose body ended after the agent was removed: dropped, not an error, and
    // the batch it is in still stores the others.
    fx.manager
        .record_model_requests(&[request(&gone, now, 10, 5), request(&kept, now, 1, 1)])
        .await
        .expect("a record of a removed agent is no error");
    assert_eq!(fx.manager.model_usage(&gone), ModelUsage::default());
    assert_eq!(rows(&db, "model_requests", &gone).await, 0);
    assert_eq!(fx.manager.model_usage(&kept), usage(2, 2, 2));
    assert_eq!(fx.manager.metrics().snapshot().model_requests, 3, "the dropped one is not counted");
    fx.store.close().await;
}

#[tokio::test]
async fn old_requests_are_pruned_with_the_events_and_the_sums_stay() {
    let mut config = test_config();
    config.events_retention = Some(Duration::from_secs(30 * 86_400));
    let fx = Fixture::with_config(config).await;
    let id = fx.spawn("old").await.agent.id;
    let now = fx.clock.now();
    fx.manager
        .record_model_requests(&[request(&id, now - time::Duration::days(31), 10, 5), request(&id, now, 1, 2)])
        .await
        .expect("record");
    fx.manager.prune_events().await.expect("prune");
    let left: Vec<u64> =
        fx.manager.model_requests("old", 10).await.expect("records").iter().map(|r| r.input_tokens).collect();
    assert_eq!(left, [1], "the request older than the retention went");
    assert_eq!(fx.manager.model_usage(&id), usage(2, 11, 7), "the sums cover the agent's whole life");
}

#[tokio::test]
async fn spawn_limits_are_checked_kept_and_merged_with_the_defaults() {
    let mut config = test_config();
    config.model_limits =
        ModelLimits { requests_per_minute: Some(5), max_concurrent_requests: Some(2), ..ModelLimits::default() };
    let fx = Fixture::with_config(config).await;
    for (field, limits) in [
        ("model_limits.requests_per_minute", ModelLimits { requests_per_minute: Some(0), ..ModelLimits::default() }),
        (
            "model_limits.max_concurrent_requests",
            ModelLimits { max_concurrent_requests: Some(0), ..ModelLimits::default() },
        ),
        (
            "model_limits.max_output_tokens_per_day",
            ModelLimits { max_output_tokens_per_day: Some(0), ..ModelLimits::default() },
        ),
    ] {
        let new = NewAgent { name: "zero".into(), model_limits: Some(limits), ..NewAgent::default() };
        match fx.manager.spawn(new).await {
            Err(ManagerError::Invalid { field: f, message }) => {
                assert_eq!(f, field);
                assert!(message.contains("at least 1"), "{message}");
            }
            other => panic!("a limit of 0 must be refused naming {field}: {other:?}"),
        }
    }
    let own = ModelLimits { requests_per_minute: Some(1), max_output_tokens_per_day: Some(100), ..Default::default() };
    let view = fx.spawn_with(NewAgent { name: "own".into(), model_limits: Some(own), ..NewAgent::default() }).await;
    assert_eq!(view.agent.spec.model_limits, own, "the spawn's own limits are kept as given");
    assert_eq!(
        view.model_limits,
        ModelLimits {
            requests_per_minute: Some(1),
            max_concurrent_requests: Some(2),
            max_output_tokens_per_day: Some(100)
        },
        "unset fields follow [model]"
    );
    let plain = fx.spawn("plain").await;
    assert_eq!(plain.agent.spec.model_limits, ModelLimits::default());
    assert_eq!(plain.model_limits, fx.manager.config().model_limits);
    assert_eq!(plain.model_usage, ModelUsage::default());
}
