//! agentd's build tasks: `cargo xtask ci | images | integration | bench`.
//!
//! `ci` is the project's test command. On a fresh Debian/Ubuntu machine, as root, it
//! installs Docker Engine and Podman, starts them without systemd, builds the test images
//! offline, and runs fmt, clippy and every test with the engines required.

mod claude_image;
mod engines;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci                                  provision engines, build images, then fmt, clippy and all tests
                                      (engines required)
  images [--test | --only nouser]     build the images from docker/ into Docker and Podman: the test
                                      images and the Claude Code image (cached under target/images/);
                                      with --test, the echo image only (agentd-echo:latest);
                                      --only nouser builds only agentd-nouser:latest (it needs
                                      agentd-claude:latest)
  integration [--backend docker|podman]
                                      provision engines, build images, run the engine tests only
  engines                             install (if missing) and start Docker and Podman, then exit
  bench                               run the criterion benchmarks
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut steps = Steps::default();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&mut steps)?,
        Some("images") => {
            let env = steps.run("engines", engines::provision)?;
            match (args.get(1).map(String::as_str), args.get(2).map(String::as_str)) {
                (None, _) => steps.run("images", || images(&env))?,
                (Some("--test"), None) => steps.run("test images", || test_images(&env))?,
                (Some("--only"), Some("nouser")) => steps.run("images", || nouser_image(&env))?,
                (Some("--only"), other) => bail!("--only takes nouser, not {other:?}\n\n{USAGE}"),
                (Some(other), _) => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        Some("integration") => {
            let backend = match args.get(1).map(String::as_str) {
                None => None,
                Some("--backend") => match args.get(2) {
                    Some(b) if ENGINE_BACKENDS.contains(&b.as_str()) => Some(b.clone()),
                    other => bail!("--backend takes one of {}, not {other:?}\n\n{USAGE}", ENGINE_BACKENDS.join(", ")),
                },
                Some(other) => bail!("unknown argument {other:?}\n\n{USAGE}"),
            };
            let env = steps.run("engines", engines::provision)?;
            steps.run("images", || images(&env))?;
            steps.run("podman bridge", || engines::pin_podman_bridge(&env))?;
            steps.run("integration tests", || integration(&env, backend.as_deref()))?;
        }
        Some("engines") => {
            steps.run("engines", engines::provision)?;
        }
        Some("bench") => {
            steps.run("bench", || {
                cargo(&["bench", "-p", "agent-manager", "--bench", "reconcile", "--bench", "list"], &[])
            })?;
        }
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            return Ok(());
        }
        Some(other) => bail!("unknown task {other:?}\n\n{USAGE}"),
    }
    steps.report();
    Ok(())
}

fn ci(steps: &mut Steps) -> Result<()> {
    let env = steps.run("engines", engines::provision)?;
    steps.run("images", || images(&env))?;
    steps.run("podman bridge", || engines::pin_podman_bridge(&env))?;
    steps.run("fmt", || cargo(&["fmt", "--all", "--", "--check"], &[]))?;
    steps.run("clippy", || {
        cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"], &[])
    })?;
    steps.run("tests", || cargo(&["test", "--workspace", "--locked"], &env.test_vars()))?;
    Ok(())
}

/// The engine backends whose tests `integration` runs: each is the crate `backend-<name>`
/// (its own tests) and the e2e tests under `<name>::`.
const ENGINE_BACKENDS: &[&str] = &["docker", "podman"];

fn integration(env: &engines::Engines, backend: Option<&str>) -> Result<()> {
    let backends: Vec<&str> = match backend {
        Some(b) => vec![b],
        None => ENGINE_BACKENDS.to_vec(),
    };
    for b in backends {
        let package = format!("backend-{b}");
        cargo(&["test", "--locked", "-p", &package], &env.test_vars())?;
        let filter = format!("{b}::");
        cargo(&["test", "--locked", "-p", "agentd", "--test", "e2e", "--", &filter], &env.test_vars())?;
    }
    Ok(())
}

/// The images built from `docker/`: (directory, tag, binary package).
const IMAGES: &[(&str, &str, &str)] = &[("docker/echo-agent", "agentd-echo:latest", "echo-agent")];

/// Builds the static binaries and the images from `docker/` into both engines, offline: the
/// test images, then the Claude Code image (see `claude_image`), then the image without a
/// `USER` made from it.
fn images(env: &engines::Engines) -> Result<()> {
    test_images(env)?;
    claude_image::build(env)?;
    nouser_image(env)
}

/// Builds the test images from `docker/` ([`IMAGES`]) into both engines.
fn test_images(env: &engines::Engines) -> Result<()> {
    let root = project_root();
    for (dir, tag, package) in IMAGES {
        let target = "x86_64-unknown-linux-gnu";
        cargo(
            &["build", "--release", "--locked", "-p", package, "--target", target],
            &[("RUSTFLAGS", "-C target-feature=+crt-static -C strip=symbols")],
        )?;
        let context = root.join("target/images").join(package);
        std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
        let binary = root.join("target").join(target).join("release").join(package);
        std::fs::copy(&binary, context.join(package)).with_context(|| format!("copying {}", binary.display()))?;
        std::fs::copy(root.join(dir).join("Dockerfile"), context.join("Dockerfile"))
            .context("copying the Dockerfile")?;
        let ctx = context.to_string_lossy().to_string();
        // The legacy builder needs no buildx plugin and no registry for FROM scratch.
        run_cmd(
            Command::new(&env.docker_cli)
                .args(["build", "-q", "-t", tag, &ctx])
                .env("DOCKER_BUILDKIT", "0")
                .env("DOCKER_HOST", &env.docker_host),
        )?;
        // Docker format keeps the HEALTHCHECK (OCI format drops it).
        run_cmd(
            Command::new("podman")
                .args(["build", "-q", "--format", "docker", "-t", tag, &ctx])
                .env("CONTAINERS_CONF", &env.containers_conf),
        )?;
        println!("xtask: built {tag} for docker and podman");
    }
    Ok(())
}

/// The test image without a `USER`, from `docker/nouser/`: the Claude Code image (so it has
/// `id` and bash) with its `USER` taken away; no layer of its own.
const NOUSER: (&str, &str) = ("docker/nouser", "agentd-nouser:latest");

/// Builds [`NOUSER`] into both engines from `agentd-claude:latest`, and checks that the
/// image names no user.
fn nouser_image(env: &engines::Engines) -> Result<()> {
    let (dir, tag) = NOUSER;
    let ctx = project_root().join(dir).to_string_lossy().to_string();
    let docker = || {
        let mut cmd = Command::new(&env.docker_cli);
        cmd.env("DOCKER_BUILDKIT", "0").env("DOCKER_HOST", &env.docker_host);
        cmd
    };
    let podman = || {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &env.containers_conf);
        cmd
    };
    run_cmd(docker().args(["build", "-q", "-t", tag, &ctx]))?;
    run_cmd(podman().args(["build", "-q", "--format", "docker", "-t", tag, &ctx]))?;
    for (name, mut cmd) in [("docker", docker()), ("podman", podman())] {
        let output = cmd
            .args(["image", "inspect", "--format", "{{json .Config.User}}", tag])
            .output()
            .with_context(|| format!("could not run {name} image inspect {tag}"))?;
        let user = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() || !matches!(user.as_str(), "\"\"" | "null") {
            bail!("{name}: {tag} should name no USER, but `image inspect` says {user:?} ({})", output.status);
        }
    }
    println!("xtask: built {tag} (no USER) for docker and podman");
    Ok(())
}

/// The repository root (the parent of this crate's manifest directory).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo(args: &[&str], vars: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(project_root());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    run_cmd(&mut cmd)
}

/// Runs a command with inherited output; a non-zero exit is an error naming it.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    println!("xtask: $ {shown}");
    let status = cmd.status().with_context(|| format!("could not run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Timed steps, reported at the end.
#[derive(Default)]
struct Steps {
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn run<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("xtask: == {name} ==");
        let started = Instant::now();
        let outcome = step().with_context(|| format!("step {name:?} failed"));
        let took = started.elapsed();
        println!(
            "xtask: == {name}: {} in {:.1}s ==",
            if outcome.is_ok() { "ok" } else { "FAILED" },
            took.as_secs_f64()
        );
        self.done.push((name.to_owned(), took));
        outcome
    }

    fn report(&self) {
        let total: Duration = self.done.iter().map(|(_, d)| *d).sum();
        println!("xtask: step times:");
        for (name, took) in &self.done {
            println!("xtask:   {name:<20} {:>7.1}s", took.as_secs_f64());
        }
        println!("xtask:   {:<20} {:>7.1}s", "total", total.as_secs_f64());
    }
}
