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
  images [--test]                     build the images from docker/ into Docker and Podman: the test
                                      images and the Claude Code image (cached under target/images/);
                                      with --test, the test images only (agentd-echo:latest)
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
            match args.get(1).map(String::as_str) {
                None => steps.run("images", || images(&env))?,
                Some("--test") => steps.run("test images", || test_images(&env))?,
                Some(other) => bail!("unknown argument {other:?}\n\n{USAGE}"),
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
            steps.run("bench", || cargo(&["bench", "-p", "agent-manager", "--bench", "reconcile"], &[]))?;
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
/// test images, then the Claude Code image (see `claude_image`).
fn images(env: &engines::Engines) -> Result<()> {
    test_images(env)?;
    claude_image::build(env)
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
