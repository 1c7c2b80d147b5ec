//! Paging of `GET /v1/agents` and `GET /v1/events` (issue J, item 21): `limit`, a cursor
//! handed back in `X-Next-Cursor`, a default and a maximum page size, and a client
//! (`agentd ls`) that reads every page.

use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentManager, NewAgent};
use backend_core::ExecutionBackend;
use backend_mock::MockEngine;
use reqwest::StatusCode;
use serde_json::Value;

#[path = "support/in_process.rs"]
mod in_process;
use in_process::{test_config, InProcess};

struct TestDaemon {
    base: String,
    http: reqwest::Client,
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    daemon: InProcess,
}

/// A page: its status, its items, and its `X-Next-Cursor`.
struct Page {
    status: StatusCode,
    body: Value,
    next: Option<String>,
}

impl Page {
    fn names(&self) -> Vec<String> {
        self.items().iter().map(|a| a["name"].as_str().expect("name").to_owned()).collect()
    }

    fn items(&self) -> &Vec<Value> {
        self.body.as_array().unwrap_or_else(|| panic!("not a page ({}): {}", self.status, self.body))
    }
}

impl TestDaemon {
    async fn start() -> Self {
        let daemon = InProcess::start(&test_config(None), MockEngine::new()).await;
        Self { base: daemon.base.clone(), http: reqwest::Client::new(), manager: daemon.manager.clone(), daemon }
    }

    /// Creates agents `prefix-0000` … in order (through the manager: quicker than HTTP).
    async fn spawn_many(&self, prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
        let mut names = Vec::new();
        for i in range {
            let name = format!("{prefix}-{i:04}");
            self.manager
                .spawn(NewAgent { name: name.clone(), ..NewAgent::default() })
                .await
                .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
            names.push(name);
        }
        names
    }

    async fn get(&self, path_and_query: &str) -> Page {
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            self.http.get(format!("{}{path_and_query}", self.base)).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("GET {path_and_query} did not answer within 30 s"))
        .expect("request");
        let status = response.status();
        let next = response.headers().get("x-next-cursor").map(|v| v.to_str().expect("ASCII cursor").to_owned());
        let text = response.text().await.expect("body");
        Page { status, body: serde_json::from_str(&text).unwrap_or(Value::String(text)), next }
    }

    async fn stop(self) {
        self.daemon.stop(Duration::from_secs(60)).await;
    }
}

fn error_text(page: &Page) -> String {
    page.body["error"].as_str().unwrap_or_else(|| panic!("no error in {}", page.body)).to_owned()
}

#[tokio::test]
async fn agents_are_listed_page_by_page_with_a_cursor_that_holds_its_place() {
    let d = TestDaemon::start().await;
    d.spawn_many("page", 0..7).await;
    // The list's order: creation time, then id (agents made in the same millisecond
    // come in id order).
    let names = d.get("/v1/agents?limit=1000").await.names();
    assert_eq!(names.len(), 7);

    let first = d.get("/v1/agents?limit=3").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.names(), names[0..3], "the first page, oldest first");
    let cursor = first.next.clone().expect("a full page with more after it names the next page");

    // An agent already seen goes away and a new one arrives: the cursor keeps its place,
    // nothing is skipped or shown twice.
    d.manager.remove(&names[0]).await.expect("remove");
    let late = d.spawn_many("page", 7..8).await;

    let second = d.get(&format!("/v1/agents?limit=3&cursor={cursor}")).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_eq!(second.names(), names[3..6]);
    let cursor = second.next.clone().expect("a next page");
    let last = d.get(&format!("/v1/agents?limit=3&cursor={cursor}")).await;
    assert_eq!(last.names(), [names[6].clone(), late[0].clone()]);
    assert_eq!(last.next, None, "the last page names no next one");

    // Without a limit: the default page (500) holds them all, and names no next page.
    let all = d.get("/v1/agents").await;
    assert_eq!(all.items().len(), 7);
    assert_eq!(all.next, None);

    // The status filter pages too.
    d.manager.stop(&names[2]).await.expect("stop");
    d.manager.stop(&names[5]).await.expect("stop");
    let stopped = d.get("/v1/agents?status=stopped&limit=1").await;
    assert_eq!(stopped.names(), [names[2].clone()]);
    let cursor = stopped.next.clone().expect("another stopped agent follows");
    let stopped = d.get(&format!("/v1/agents?status=stopped&limit=1&cursor={cursor}")).await;
    assert_eq!(stopped.names(), [names[5].clone()]);
    // A page that ends exactly at the last match may still name a next page only if
    // more agents match after it: none do.
    assert_eq!(stopped.next, None);
    d.stop().await;
}

#[tokio::test]
async fn a_page_without_a_limit_holds_500_agents_and_more_than_1000_are_refused() {
    let d = TestDaemon::start().await;
    d.spawn_many("many", 0..501).await;
    let names = d.get("/v1/agents?limit=1000").await.names();
    assert_eq!(names.len(), 501);
    let first = d.get("/v1/agents").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.items().len(), 500, "the default page size");
    let cursor = first.next.clone().expect("501 agents make two default pages");
    let rest = d.get(&format!("/v1/agents?cursor={cursor}")).await;
    assert_eq!(first.names(), names[..500]);
    assert_eq!(rest.names(), [names[500].clone()]);
    assert_eq!(rest.next, None);

    for (query, says) in [
        ("limit=0", "limit: 0 is out of range: give 1 to 1000 agents a page"),
        ("limit=1001", "limit: 1001 is out of range: give 1 to 1000 agents a page"),
        ("limit=-1", "limit"),
        ("cursor=not-a-cursor", "is not a cursor this daemon gave out"),
        ("cursor=bm9jb2xvbg", "leave cursor out to start from the first page"),
    ] {
        let page = d.get(&format!("/v1/agents?{query}")).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{query}: {}", page.body);
        assert!(error_text(&page).contains(says), "{query}: {}", page.body);
    }
    d.stop().await;
}

#[tokio::test]
async fn events_are_listed_page_by_page_after_the_cursor() {
    let d = TestDaemon::start().await;
    d.spawn_many("ev", 0..3).await;
    // Each spawn records `spawned` and `started`: six events.
    let all = d.get("/v1/events").await;
    let ids: Vec<i64> = all.items().iter().map(|e| e["id"].as_i64().expect("id")).collect();
    assert_eq!(ids.len(), 6, "{}", all.body);
    assert_eq!(all.next, None, "everything fits the default page");

    let mut seen = Vec::new();
    let mut query = "/v1/events?limit=4".to_owned();
    let mut pages = 0;
    loop {
        let page = d.get(&query).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(page.items().iter().map(|e| e["id"].as_i64().expect("id")));
        pages += 1;
        match page.next {
            Some(next) => {
                assert_eq!(Some(next.parse::<i64>().expect("an event id")), seen.last().copied());
                query = format!("/v1/events?limit=4&after={next}");
            }
            None => break,
        }
        assert!(pages < 10, "the cursor does not advance");
    }
    assert_eq!(seen, ids, "the pages hold every event once, in order");
    assert_eq!(pages, 2);
    // A page that ends on the last event names no next page.
    let exact = d.get(&format!("/v1/events?limit=2&after={}", ids[3])).await;
    assert_eq!(exact.items().len(), 2);
    assert_eq!(exact.next, None);
    d.stop().await;
}

#[tokio::test]
async fn agentd_ls_reads_every_page() {
    let d = TestDaemon::start().await;
    // More than the largest page the client asks for (1000).
    let names = d.spawn_many("ls", 0..1003).await;
    let xdg = tempdir();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.args(["ls", "--json"]).env("XDG_CONFIG_HOME", &xdg);
    for (key, _) in std::env::vars() {
        if key.starts_with("AGENTD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AGENTD_URL", &d.base);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run agentd");
    assert!(out.status.success(), "agentd ls: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("agentd ls --json prints JSON");
    let mut listed: Vec<String> =
        listed.as_array().expect("an array").iter().map(|a| a["name"].as_str().expect("name").to_owned()).collect();
    assert_eq!(listed.len(), names.len(), "agentd ls --json lists every agent, across pages");
    listed.sort();
    listed.dedup();
    assert!(listed == names, "agentd ls --json lists each agent once");
    let _ = std::fs::remove_dir_all(&xdg);
    d.stop().await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("agentd-paging-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
