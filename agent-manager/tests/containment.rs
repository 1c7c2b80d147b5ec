//! Identity and files: who an agent runs as, and which host directories it may be given.

mod common;

use std::path::{Path, PathBuf};

use agent_manager::{ManagerError, NewAgent, ProtectedPath};
use backend_mock::{ECHO_IMAGE, PLAIN_IMAGE};
use common::{test_config, Fixture};

/// A directory of the test's own under the system's temp dir, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-containment-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // The canonical form: the temp dir itself may be behind a symlink.
        Self(std::fs::canonicalize(&dir).expect("canonical temp dir"))
    }

    fn join(&self, part: &str) -> PathBuf {
        self.0.join(part)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn agent(name: &str) -> NewAgent {
    NewAgent { name: name.into(), ..NewAgent::default() }
}

fn with_workdir(name: &str, dir: &Path) -> NewAgent {
    NewAgent { workdir: Some(dir.to_path_buf()), ..agent(name) }
}

/// The refusal's field and rule; panics on anything else.
fn refusal(outcome: Result<agent_manager::AgentView, ManagerError>) -> (&'static str, String) {
    match outcome {
        Err(ManagerError::Refused { field, rule, .. }) => (field, rule),
        Err(other) => panic!("expected Refused, got {other:?} ({other})"),
        Ok(view) => panic!("expected Refused, but {} was spawned", view.agent.name),
    }
}

#[tokio::test]
async fn an_image_without_a_user_or_with_root_runs_as_the_default_user() {
    let fx = Fixture::new().await;
    fx.engine.add_image("root-user:1", Some("0:0"));
    fx.engine.add_image("root-name:1", Some("root"));
    fx.engine.add_image("own-user:1", Some("agent"));
    let cases = [
        ("nouser", PLAIN_IMAGE, Some("1000:1000")),
        ("rootuid", "root-user:1", Some("1000:1000")),
        ("rootname", "root-name:1", Some("1000:1000")),
        // An image that names a user other than root keeps it.
        ("echo", ECHO_IMAGE, None),
        ("own", "own-user:1", None),
    ];
    for (name, image, expect) in cases {
        let view = fx.spawn_with(NewAgent { image: Some(image.into()), ..agent(name) }).await;
        let spec = fx.engine.created_spec(&view.agent.session).expect("created");
        assert_eq!(spec.user.as_deref(), expect, "{name} on {image}");
    }
    // The spec's own user wins.
    let view = fx.spawn_with(NewAgent { user: Some("1234:5678".into()), ..agent("explicit") }).await;
    assert_eq!(fx.engine.created_spec(&view.agent.session).expect("created").user.as_deref(), Some("1234:5678"));

    // Another default, and the restart of an agent gets it again.
    let mut config = test_config();
    config.defaults.default_user = "2000:3000".into();
    let fx = Fixture::with_config(config).await;
    let view = fx.spawn("other").await;
    assert_eq!(fx.engine.created_spec(&view.agent.session).expect("created").user.as_deref(), Some("2000:3000"));
    fx.manager.restart("other").await.expect("restart");
    assert_eq!(fx.engine.created_spec(&view.agent.session).expect("recreated").user.as_deref(), Some("2000:3000"));
}

#[tokio::test]
async fn root_is_refused_unless_the_daemon_allows_it() {
    let fx = Fixture::new().await;
    for (i, user) in ["0", "root", "0:0", "root:1000", "root:wheel", "00"].into_iter().enumerate() {
        let name = format!("root{i}");
        let (field, rule) = refusal(fx.manager.spawn(NewAgent { user: Some(user.into()), ..agent(&name) }).await);
        assert_eq!(field, "user", "{user}");
        assert!(rule.contains("agents.allow_root = true"), "{user}: {rule}");
        assert!(matches!(fx.manager.get(&name).await, Err(ManagerError::AgentNotFound(_))), "no record for {user}");
    }
    assert_eq!(fx.engine.container_count(), 0);
    // The error says what was refused and why, as the API shows it.
    let err = fx.manager.spawn(NewAgent { user: Some("0".into()), ..agent("shown") }).await.expect_err("refused");
    assert!(err.to_string().starts_with("user \"0\" is refused: "), "{err}");

    let mut config = test_config();
    config.defaults.allow_root = true;
    let fx = Fixture::with_config(config).await;
    let view = fx.spawn_with(NewAgent { user: Some("0".into()), ..agent("root") }).await;
    assert_eq!(fx.engine.created_spec(&view.agent.session).expect("created").user.as_deref(), Some("0"));
    // Even then an image without a user runs as the default user: root is asked for by name.
    let view = fx.spawn("plain").await;
    assert_eq!(fx.engine.created_spec(&view.agent.session).expect("created").user.as_deref(), Some("1000:1000"));
}

#[tokio::test]
async fn a_root_default_user_is_refused_by_the_configuration_and_at_creation() {
    let mut config = test_config();
    config.defaults.default_user = "root".into();
    let fields: Vec<_> = config.defaults.check().into_iter().map(|v| (v.field, v.allowed)).collect();
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert_eq!(fields[0].0, "default_user");
    assert!(fields[0].1.contains("agents.allow_root"), "{fields:?}");
    // A manager built around the check still refuses to run an image without a user as root.
    let fx = Fixture::with_config(config.clone()).await;
    let (field, _) = refusal(fx.manager.spawn(agent("plain")).await);
    assert_eq!(field, "agents.default_user");
    assert_eq!(fx.engine.container_count(), 0);
    // Allowed, it is fine.
    config.defaults.allow_root = true;
    assert!(config.defaults.check().is_empty());
    // Malformed defaults and roots are named too.
    config.defaults.default_user = "Agent".into();
    config.defaults.workdir_roots = vec!["relative/dir".into()];
    let fields: Vec<_> = config.defaults.check().into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["default_user", "workdir_roots"]);
}

#[tokio::test]
async fn malformed_users_are_invalid_naming_the_field() {
    let fx = Fixture::new().await;
    for user in ["", "1000:", ":1000", "Agent", "a b", "4294967296", "agent:agent", &"a".repeat(33)] {
        match fx.manager.spawn(NewAgent { user: Some(user.into()), ..agent("bad") }).await {
            Err(ManagerError::Invalid { field: "user", message }) => {
                assert!(message.contains("NAME, UID or UID:GID"), "{user:?}: {message}")
            }
            other => panic!("{user:?}: expected an invalid user, got {other:?}"),
        }
    }
    for user in ["agent", "1000", "1000:1000", "_svc-1"] {
        fx.spawn_with(NewAgent { user: Some(user.into()), ..agent(&format!("ok{}", user.len())) }).await;
    }
}

#[tokio::test]
async fn protected_workdirs_are_refused_naming_the_rule() {
    let base = TempDir::new("protected");
    let socket_dir = base.join("engine");
    let data_dir = base.join("data");
    let roots = base.join("roots");
    for dir in [&socket_dir, &data_dir, &roots.join("project/sub"), &base.join("elsewhere")] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::fs::write(base.join("a-file"), b"x").expect("file");
    std::os::unix::fs::symlink("/etc", base.join("to-etc")).expect("symlink");
    std::os::unix::fs::symlink(&socket_dir, roots.join("to-engine")).expect("symlink");
    let mut config = test_config();
    config.protected_paths = vec![
        ProtectedPath::new(&socket_dir, "the directory of the mock engine's socket"),
        ProtectedPath::new(&data_dir, "agentd's data directory"),
    ];
    config.defaults.workdir_roots = vec![roots.clone()];
    let fx = Fixture::with_config(config).await;
    let cases: Vec<(PathBuf, String)> = vec![
        ("/".into(), "the host's root directory".into()),
        ("/etc".into(), "inside /etc, a system directory".into()),
        ("/etc/ssl".into(), "inside /etc, a system directory".into()),
        ("/proc".into(), "inside /proc, a system directory".into()),
        ("/sys".into(), "inside /sys, a system directory".into()),
        ("/dev".into(), "inside /dev, a system directory".into()),
        ("/run".into(), "inside /run, a system directory".into()),
        // /var/run resolves to /run on this host (or is /var/run itself elsewhere).
        ("/var/run".into(), "a system directory".into()),
        ("/var".into(), "contains /var/run, a system directory".into()),
        ("/var/lib".into(), "contains /var/lib/docker, a system directory".into()),
        (socket_dir.clone(), "the directory of the mock engine's socket".into()),
        (data_dir.join("."), "agentd's data directory".into()),
        (base.0.clone(), format!("contains {}, the directory of the mock engine's socket", socket_dir.display())),
        (base.join("to-etc"), "resolves to /etc, which is inside /etc, a system directory".into()),
        (base.join("to-etc/ssl"), "inside /etc".into()),
        (roots.join("to-engine"), "the directory of the mock engine's socket".into()),
        (roots.join("project/../../data"), "agentd's data directory".into()),
        (base.join("elsewhere"), format!("outside agents.workdir_roots ({})", roots.display())),
        ("relative/dir".into(), "must be an absolute path".into()),
        (base.join("missing"), "must be an existing directory".into()),
        (base.join("a-file"), "is not a directory".into()),
    ];
    for (i, (dir, expect)) in cases.iter().enumerate() {
        let name = format!("w{i}");
        let (field, rule) = refusal(fx.manager.spawn(with_workdir(&name, dir)).await);
        assert_eq!(field, "workdir", "{}", dir.display());
        assert!(rule.contains(expect.as_str()), "{}: expected {expect:?} in {rule:?}", dir.display());
        assert!(matches!(fx.manager.get(&name).await, Err(ManagerError::AgentNotFound(_))));
    }
    assert_eq!(fx.engine.container_count(), 0, "nothing refused was created");

    // Inside a root, through `..` and a symlink: allowed, stored and mounted canonically.
    std::os::unix::fs::symlink(roots.join("project"), base.join("link")).expect("symlink");
    let view = fx.spawn_with(with_workdir("ok", &base.join("link/sub/../sub"))).await;
    let canonical = roots.join("project/sub");
    assert_eq!(view.agent.spec.workdir.as_deref(), Some(canonical.as_path()), "the stored workdir");
    let stored = fx.store.find_agent("ok").expect("stored");
    assert_eq!(stored.spec.workdir.as_deref(), Some(canonical.as_path()));
    let created = fx.engine.created_spec(&view.agent.session).expect("created");
    assert_eq!(created.workdir.as_deref(), Some(canonical.as_path()), "the mounted workdir");
}

#[tokio::test]
async fn a_stored_agent_whose_workdir_became_protected_fails_its_next_creation() {
    let base = TempDir::new("stored");
    let fx = Fixture::new().await;
    fx.spawn_with(with_workdir("kept", &base.0)).await;
    // The next daemon protects that directory (say, it moved its data there).
    let mut config = test_config();
    config.protected_paths = vec![ProtectedPath::new(&base.0, "agentd's data directory")];
    let next = Fixture::on(fx.engine.clone(), fx.store.clone(), config, fx.clock.clone()).await;
    let err = next.manager.restart("kept").await.expect_err("refused");
    match &err {
        ManagerError::Refused { field: "workdir", rule, .. } => {
            assert!(rule.contains("agentd's data directory"), "{rule}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    let view = next.get("kept").await;
    assert_ne!(view.agent.status, agent_manager::AgentStatus::Running);
    let reason = view.agent.reason.unwrap_or_default();
    assert!(reason.contains("is refused") && reason.contains("agentd's data directory"), "{reason}");
    assert_eq!(view.agent.spec.workdir.as_deref(), Some(base.0.as_path()), "the workdir is kept, not dropped");
}
