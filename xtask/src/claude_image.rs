//! The Claude Code agent image, `agentd-claude:latest`, built offline from the npm registry and
//! Debian's apt mirror into both engines.
//!
//! The inputs live in `docker/claude-code/`: `release.env` pins the native Claude Code package
//! (name, version, sha512 integrity), `rootfs.env` names the Debian suite and packages, and
//! `Dockerfile.offline` assembles the image `FROM scratch`. Everything fetched or generated is
//! cached under `target/images/claude-code/`, keyed by those inputs:
//!
//! - `downloads/<name>-<version>-<digest>.tgz`: the npm tarball, checked against the pinned
//!   sha512 when it is fetched and again whenever it is used;
//! - `rootfs-<key>.tar`: the Debian root filesystem from mmdebstrap, with the agent user;
//! - `context/`: the build context (`Dockerfile`, `rootfs.tar`, `claude`), stamped with the
//!   hash of all inputs.
//!
//! Each engine's image carries the label `agentd.inputs=<that hash>`. An engine whose image
//! already has it is skipped, so a warm run only inspects two images.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::engines::{which, Engines};
use crate::{project_root, run_cmd};

/// The tag the image gets in both engines.
pub const TAG: &str = "agentd-claude:latest";

/// The label that records which inputs an image was built from.
const INPUTS_LABEL: &str = "agentd.inputs";

/// Where the inputs live, relative to the repository root.
const SOURCE_DIR: &str = "docker/claude-code";

/// Where the cache lives, relative to the repository root.
const CACHE_DIR: &str = "target/images/claude-code";

/// Creates the agent's user in the root filesystem. `Dockerfile` runs the same command.
pub(crate) const CREATE_AGENT_USER: &str =
    "useradd --uid 1000 --user-group --create-home --home-dir /home/agent --shell /bin/bash agent";

/// Creates the directories the agent writes to. `Dockerfile` runs the same command.
pub(crate) const CREATE_AGENT_DIRS: &str = "install -d -o 1000 -g 1000 /workspace /home/agent/.claude";

/// Paths dpkg leaves out of the root filesystem (and of anything installed in it later).
const DPKG_EXCLUDED: &[&str] =
    &["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*", "/usr/share/lintian/*"];

/// Paths kept despite `DPKG_EXCLUDED`: the packages' licenses.
const DPKG_INCLUDED: &[&str] = &["/usr/share/doc/*/copyright"];

/// Leftovers of the installation that the image does not need (mmdebstrap itself already drops
/// the package lists and the apt cache).
const LEFTOVERS: &str = "rm -f \"$1\"/var/log/dpkg.log \"$1\"/var/log/alternatives.log \"$1\"/var/log/apt/*.log \
                         \"$1\"/var/cache/debconf/*-old \"$1\"/var/lib/dpkg/*-old";

/// The pinned Claude Code release, from `docker/claude-code/release.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Release {
    /// The version, such as `1.2.3`.
    pub version: String,
    /// The npm package holding the native binary, such as `@anthropic-ai/claude-code-linux-x64`.
    pub package: String,
    /// The npm integrity of its tarball: `sha512-` and the base64 digest.
    pub integrity: String,
}

impl Release {
    /// Reads and checks the pin file.
    pub fn load(path: &Path) -> Result<Release> {
        let mut vars = read_env_file(path)?;
        let mut take = |key: &str| vars.remove(key).with_context(|| format!("{} does not set {key}", path.display()));
        let release = Release {
            version: take("CLAUDE_CODE_VERSION")?,
            package: take("CLAUDE_CODE_PACKAGE")?,
            integrity: take("CLAUDE_CODE_INTEGRITY")?,
        };
        ensure!(
            !release.version.is_empty()
                && release.version.chars().all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c)),
            "{}: CLAUDE_CODE_VERSION={:?} is not a version",
            path.display(),
            release.version
        );
        ensure!(
            release.package.starts_with('@') && release.package.split('/').count() == 2,
            "{}: CLAUDE_CODE_PACKAGE={:?} is not a scoped npm package name",
            path.display(),
            release.package
        );
        ensure!(
            release.integrity.strip_prefix("sha512-").is_some_and(|d| d.len() == 88 && d.ends_with("==")),
            "{}: CLAUDE_CODE_INTEGRITY must be an npm sha512 integrity (`sha512-` and 88 base64 characters), \
             as `npm view {}@{} dist.integrity` prints it",
            path.display(),
            release.package,
            release.version
        );
        Ok(release)
    }

    /// The package name without its scope, as the tarball is named.
    fn base_name(&self) -> &str {
        self.package.rsplit('/').next().unwrap_or(&self.package)
    }

    /// The cached tarball's file name: name, version, and the start of the digest.
    fn tarball_name(&self) -> String {
        let digest: String = self
            .integrity
            .trim_start_matches("sha512-")
            .chars()
            .take(16)
            .map(|c| match c {
                '/' => '_',
                '+' => '-',
                c => c,
            })
            .collect();
        format!("{}-{}-{digest}.tgz", self.base_name(), self.version)
    }
}

/// The Debian root filesystem, from `docker/claude-code/rootfs.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rootfs {
    /// The Debian suite, such as `bookworm`.
    pub suite: String,
    /// The packages installed on top of the minbase variant.
    pub packages: Vec<String>,
}

impl Rootfs {
    /// Reads and checks the recipe file.
    pub fn load(path: &Path) -> Result<Rootfs> {
        let mut vars = read_env_file(path)?;
        let mut take = |key: &str| vars.remove(key).with_context(|| format!("{} does not set {key}", path.display()));
        let suite = take("DEBIAN_SUITE")?;
        let packages: Vec<String> = take("DEBIAN_PACKAGES")?.split_whitespace().map(str::to_owned).collect();
        ensure!(
            !suite.is_empty() && suite.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{}: DEBIAN_SUITE={suite:?} is not a Debian suite name",
            path.display()
        );
        ensure!(!packages.is_empty(), "{}: DEBIAN_PACKAGES is empty", path.display());
        Ok(Rootfs { suite, packages })
    }

    /// mmdebstrap's arguments, except the output and the mirrors: everything that decides what
    /// ends up in the root filesystem, and therefore its cache key.
    fn mmdebstrap_args(&self) -> Vec<String> {
        let mut args = vec![
            "--variant=minbase".to_owned(),
            format!("--include={}", self.packages.join(",")),
            "--aptopt=Acquire::Languages \"none\"".to_owned(),
        ];
        args.extend(DPKG_EXCLUDED.iter().map(|p| format!("--dpkgopt=path-exclude={p}")));
        args.extend(DPKG_INCLUDED.iter().map(|p| format!("--dpkgopt=path-include={p}")));
        for hook in [format!("chroot \"$1\" {CREATE_AGENT_USER}"), format!("chroot \"$1\" {CREATE_AGENT_DIRS}")] {
            args.push(format!("--customize-hook={hook}"));
        }
        args.push(format!("--customize-hook={LEFTOVERS}"));
        args.push(self.suite.clone());
        args
    }
}

/// One engine to build into.
struct Engine {
    name: &'static str,
    program: String,
    vars: Vec<(&'static str, String)>,
    build_flags: &'static [&'static str],
}

impl Engine {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// The id and the inputs label of the engine's image, or None when it has no such image.
    fn image(&self) -> Option<(String, String)> {
        let format = format!("{{{{.Id}}}} {{{{index .Config.Labels \"{INPUTS_LABEL}\"}}}}");
        let output = self.command().args(["image", "inspect", "--format", &format, TAG]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let (id, label) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        Some((id.to_owned(), label.trim().to_owned()))
    }

    /// Builds the image from `context`, labelled with `inputs`, then checks that it runs.
    fn build(&self, context: &Path, inputs: &str, release: &Release) -> Result<()> {
        let replaced = self.image().map(|(id, _)| id);
        let label = format!("{INPUTS_LABEL}={inputs}");
        let ctx = context.to_string_lossy();
        let started = Instant::now();
        run_cmd(self.command().arg("build").args(self.build_flags).args(["-q", "--label", &label, "-t", TAG, &ctx]))
            .with_context(|| format!("building {TAG} with {}", self.name))?;
        println!("xtask: built {TAG} for {} in {:.1}s", self.name, started.elapsed().as_secs_f64());

        // A smoke test: the binary starts, as the image's user, and is the pinned release.
        let output = self
            .command()
            .args(["run", "--rm", TAG, "claude", "--version"])
            .output()
            .with_context(|| format!("could not run {} to check {TAG}", self.program))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.starts_with(&release.version) {
            // It carries the current label: drop it, or the next run would take it as up to date.
            let _ = self.command().args(["image", "rm", TAG]).output();
            bail!(
                "`{} run --rm {TAG} claude --version` printed {:?} ({}), expected {} first; stderr:\n{}",
                self.name,
                stdout.trim(),
                output.status,
                release.version,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        println!("xtask: checked: `{} run --rm {TAG} claude --version` prints {}", self.name, stdout.trim());

        // The image this one replaced is now untagged; drop it unless a container still uses it.
        if let Some(old) = replaced.filter(|old| self.image().is_some_and(|(new, _)| &new != old)) {
            let removed = self.command().args(["image", "rm", &old]).output();
            if !removed.as_ref().is_ok_and(|o| o.status.success()) {
                println!("xtask: note: kept the replaced {} image {old} (still in use?)", self.name);
            }
        }
        Ok(())
    }
}

/// Builds `agentd-claude:latest` into Docker and Podman unless both already have it from the
/// same inputs.
pub fn build(env: &Engines) -> Result<()> {
    let root = project_root();
    let source = root.join(SOURCE_DIR);
    let release_file = source.join("release.env");
    let release = Release::load(&release_file)?;
    let rootfs = Rootfs::load(&source.join("rootfs.env"))?;
    let dockerfile_path = source.join("Dockerfile.offline");
    let dockerfile =
        fs::read_to_string(&dockerfile_path).with_context(|| format!("reading {}", dockerfile_path.display()))?;
    let release_text =
        fs::read_to_string(&release_file).with_context(|| format!("reading {}", release_file.display()))?;

    let rootfs_args = rootfs.mmdebstrap_args();
    let rootfs_key = sha256_hex(format!("agentd rootfs v1\n{}\n", rootfs_args.join("\n")).as_bytes())?;
    let inputs =
        sha256_hex(format!("agentd-claude inputs v1\n{release_text}\nrootfs {rootfs_key}\n{dockerfile}").as_bytes())?;

    let engines = [
        Engine {
            name: "docker",
            program: env.docker_cli.clone(),
            vars: vec![("DOCKER_HOST", env.docker_host.clone()), ("DOCKER_BUILDKIT", "0".to_owned())],
            // The legacy builder needs no buildx plugin and no registry for FROM scratch.
            build_flags: &[],
        },
        Engine {
            name: "podman",
            program: "podman".to_owned(),
            vars: vec![("CONTAINERS_CONF", env.containers_conf.clone())],
            // Docker format keeps the HEALTHCHECK (OCI format drops it); without layer caching
            // the image is one layer, and the inputs label already decides when to rebuild.
            build_flags: &["--format", "docker", "--layers=false"],
        },
    ];
    let stale: Vec<&Engine> = engines.iter().filter(|e| e.image().is_none_or(|(_, label)| label != inputs)).collect();
    if stale.is_empty() {
        println!(
            "xtask: {TAG} (Claude Code {}) is up to date in docker and podman ({INPUTS_LABEL}={})",
            release.version,
            &inputs[..16]
        );
        return Ok(());
    }

    let cache = root.join(CACHE_DIR);
    let context = prepare_context(&cache, &release, &rootfs, &rootfs_args, &rootfs_key, &dockerfile, &inputs)?;
    for engine in stale {
        engine.build(&context, &inputs, &release)?;
    }
    Ok(())
}

/// Makes `cache/context` the build context for `inputs`, reusing it when its stamp matches.
fn prepare_context(
    cache: &Path,
    release: &Release,
    rootfs: &Rootfs,
    rootfs_args: &[String],
    rootfs_key: &str,
    dockerfile: &str,
    inputs: &str,
) -> Result<PathBuf> {
    let context = cache.join("context");
    let stamp = ".agentd-inputs";
    let complete = ["Dockerfile", "rootfs.tar", "claude"].iter().all(|f| context.join(f).is_file());
    if complete && fs::read_to_string(context.join(stamp)).is_ok_and(|s| s == inputs) {
        println!("xtask: reusing the build context {}", context.display());
        return Ok(context);
    }

    // Both come back checked: the tarball against the pinned integrity.
    let tarball = fetch_release(&cache.join("downloads"), release)?;
    let rootfs_tar = build_rootfs(cache, rootfs, rootfs_args, rootfs_key)?;

    let partial = cache.join(format!("context.partial-{}", std::process::id()));
    remove_dir_if_present(&partial)?;
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    fs::write(partial.join("Dockerfile"), dockerfile).context("writing the Dockerfile into the build context")?;
    // A hard link costs nothing; copy only if the cache spans file systems.
    if fs::hard_link(&rootfs_tar, partial.join("rootfs.tar")).is_err() {
        fs::copy(&rootfs_tar, partial.join("rootfs.tar"))
            .with_context(|| format!("copying {} into the build context", rootfs_tar.display()))?;
    }
    let started = Instant::now();
    run_cmd(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&partial).arg("package/claude"))
        .with_context(|| format!("extracting package/claude from {}", tarball.display()))?;
    fs::rename(partial.join("package/claude"), partial.join("claude")).context("moving the claude binary")?;
    fs::remove_dir(partial.join("package")).context("removing the emptied package directory")?;
    fs::write(partial.join(stamp), inputs).context("stamping the build context")?;
    remove_dir_if_present(&context)?;
    fs::rename(&partial, &context)
        .with_context(|| format!("renaming {} to {}", partial.display(), context.display()))?;
    println!("xtask: prepared the build context {} in {:.1}s", context.display(), started.elapsed().as_secs_f64());
    Ok(context)
}

/// Returns the pinned release's tarball from the cache, fetching it from the npm registry when
/// it is missing or does not match. Only a tarball that matches the pinned integrity replaces
/// the cached one, so a wrong pin costs a download but never the cache.
fn fetch_release(dir: &Path, release: &Release) -> Result<PathBuf> {
    let path = dir.join(release.tarball_name());
    if path.is_file() {
        match integrity_of(&path) {
            Ok(actual) if actual == release.integrity => return Ok(path),
            Ok(actual) => println!("xtask: the cached {} has integrity {actual}, fetching it again", path.display()),
            Err(e) => println!("xtask: could not check the cached {}, fetching it again: {e:#}", path.display()),
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let url = tarball_url(release)?;
    let partial = dir.join(format!(".partial-{}", std::process::id()));
    let started = Instant::now();
    run_cmd(
        Command::new("curl")
            .args(["--fail", "--silent", "--show-error", "--location", "--retry", "3", "--output"])
            .arg(&partial)
            .arg(&url),
    )
    .with_context(|| format!("downloading {url} (is curl installed and the npm registry reachable?)"))?;
    let actual = integrity_of(&partial);
    if !actual.as_ref().is_ok_and(|a| *a == release.integrity) {
        let _ = fs::remove_file(&partial);
        let actual = actual?;
        bail!(
            "refusing the tarball from {url}: its integrity is {actual}, but {SOURCE_DIR}/release.env pins {}. \
             Compare the pin with `npm view {}@{} dist.integrity`; if the registry agrees with the pin, the \
             download was damaged on the way and another run may succeed",
            release.integrity,
            release.package,
            release.version
        );
    }
    fs::rename(&partial, &path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    println!("xtask: fetched {}@{} in {:.1}s", release.package, release.version, started.elapsed().as_secs_f64());
    prune(dir, &path, |_| true);
    Ok(path)
}

/// The tarball's URL, as the npm CLI resolves it (honouring the user's npm configuration), or
/// the public registry's when npm is not installed.
fn tarball_url(release: &Release) -> Result<String> {
    let spec = format!("{}@{}", release.package, release.version);
    if which("npm").is_none() {
        return Ok(format!(
            "https://registry.npmjs.org/{}/-/{}-{}.tgz",
            release.package,
            release.base_name(),
            release.version
        ));
    }
    let url = capture(Command::new("npm").args(["view", &spec, "dist.tarball"]))
        .with_context(|| format!("asking the npm registry for {spec} (is it reachable?)"))?;
    let url = url.trim().to_owned();
    ensure!(
        url.starts_with("https://") || url.starts_with("http://"),
        "`npm view {spec} dist.tarball` printed {url:?}, not a URL: check the version in {SOURCE_DIR}/release.env"
    );
    Ok(url)
}

/// The npm integrity (`sha512-` and the base64 digest) of a file.
fn integrity_of(path: &Path) -> Result<String> {
    let output = capture(Command::new("sha512sum").arg(path)).context("hashing with sha512sum (coreutils)")?;
    let hex = output.split_whitespace().next().unwrap_or_default();
    let digest = decode_hex(hex).with_context(|| format!("sha512sum printed {output:?}"))?;
    Ok(format!("sha512-{}", base64(&digest)))
}

/// Returns the cached root filesystem tarball for `key`, building it with mmdebstrap if needed.
fn build_rootfs(cache: &Path, rootfs: &Rootfs, args: &[String], key: &str) -> Result<PathBuf> {
    let path = cache.join(format!("rootfs-{}.tar", &key[..16]));
    if path.is_file() {
        return Ok(path);
    }
    ensure_mmdebstrap()?;
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let mirrors = debian_mirrors(&rootfs.suite, &read_apt_sources());
    println!("xtask: building the Debian {} root filesystem from {}", rootfs.suite, mirrors.join(" | "));
    let partial = cache.join(format!(".rootfs.partial-{}", std::process::id()));
    let started = Instant::now();
    let outcome = run_mmdebstrap(args, &mirrors, &partial);
    if let Err(e) = outcome {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    println!("xtask: built {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
    prune(cache, &path, |name| name.starts_with("rootfs-") && name.ends_with(".tar"));
    Ok(path)
}

/// Runs `mmdebstrap ARGS - MIRRORS | mmtarfilter --path-exclude=/dev/*` into `output`: the
/// engines provide /dev, and device nodes in an image layer only cause trouble.
fn run_mmdebstrap(args: &[String], mirrors: &[String], output: &Path) -> Result<()> {
    let file = fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap.args(args).arg("-").args(mirrors).stdout(Stdio::piped());
    println!("xtask: $ {mmdebstrap:?} | mmtarfilter --path-exclude=/dev/*");
    let mut producer = mmdebstrap.spawn().context("could not start mmdebstrap")?;
    let pipe = producer.stdout.take().context("mmdebstrap has no stdout pipe")?;
    let filtered = Command::new("mmtarfilter").arg("--path-exclude=/dev/*").stdin(pipe).stdout(file).status();
    let produced = producer.wait().context("waiting for mmdebstrap")?;
    let filtered = filtered.context("could not run mmtarfilter")?;
    if !produced.success() {
        bail!(
            "mmdebstrap failed with {produced} (see its output above). It needs root (or working user \
             namespaces) and a reachable Debian mirror for the suite in {SOURCE_DIR}/rootfs.env"
        );
    }
    ensure!(filtered.success(), "mmtarfilter failed with {filtered}");
    Ok(())
}

/// Installs mmdebstrap with apt-get if it is missing (as root), or says how to.
fn ensure_mmdebstrap() -> Result<()> {
    if which("mmdebstrap").is_some() && which("mmtarfilter").is_some() {
        return Ok(());
    }
    let is_root = capture(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0");
    if !is_root || which("apt-get").is_none() {
        bail!(
            "mmdebstrap is needed to build the Debian root filesystem of {TAG}. Install it with\n    \
             sudo apt-get install -y --no-install-recommends mmdebstrap\nthen run `cargo xtask images` again"
        );
    }
    println!("xtask: installing mmdebstrap");
    let apt = |args: &[&str]| {
        run_cmd(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
            .context("installing mmdebstrap with apt-get")
    };
    if apt(&["install", "-y", "-q", "--no-install-recommends", "mmdebstrap"]).is_err() {
        // The package lists may be missing or stale on a fresh machine.
        apt(&["update", "-q"])?;
        apt(&["install", "-y", "-q", "--no-install-recommends", "mmdebstrap"])?;
    }
    Ok(())
}

/// The host's apt sources (`/etc/apt/sources.list` and `sources.list.d/*.list|*.sources`), as
/// (file name, text) pairs. Unreadable files are skipped.
fn read_apt_sources() -> Vec<(String, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .into_iter()
        .filter_map(|path| {
            let text = fs::read_to_string(&path).ok()?;
            Some((path.file_name()?.to_string_lossy().into_owned(), text))
        })
        .collect()
}

/// The sources.list lines for `suite`, its `-updates` and its `-security` suites, taken from
/// the host's apt sources: on these machines only the mirror the host already uses is
/// reachable. Falls back to deb.debian.org when the host has no source for `suite` itself.
pub(crate) fn debian_mirrors(suite: &str, files: &[(String, String)]) -> Vec<String> {
    let wanted = [suite.to_owned(), format!("{suite}-updates"), format!("{suite}-security")];
    let mut found: Vec<(String, String)> = Vec::new();
    let mut add = |uri: &str, s: &str| {
        let entry = (uri.trim_end_matches('/').to_owned(), s.to_owned());
        if wanted.iter().any(|w| w == s) && !found.contains(&entry) {
            found.push(entry);
        }
    };
    for (name, text) in files {
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let fields = deb822_fields(stanza);
                let get = |k: &str| fields.get(&k.to_ascii_lowercase()).map(String::as_str).unwrap_or("");
                if !get("Types").split_whitespace().any(|t| t == "deb") || get("Enabled") == "no" {
                    continue;
                }
                for uri in get("URIs").split_whitespace() {
                    for s in get("Suites").split_whitespace() {
                        add(uri, s);
                    }
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                let mut words = line.split_whitespace();
                if words.next() != Some("deb") {
                    continue;
                }
                let mut rest: Vec<&str> = words.collect();
                if rest.first().is_some_and(|w| w.starts_with('[')) {
                    let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                    rest.drain(..=end);
                }
                if let [uri, s, ..] = rest.as_slice() {
                    add(uri, s);
                }
            }
        }
    }
    if !found.iter().any(|(_, s)| s == suite) {
        found = vec![
            ("http://deb.debian.org/debian".to_owned(), suite.to_owned()),
            ("http://deb.debian.org/debian".to_owned(), format!("{suite}-updates")),
            ("http://deb.debian.org/debian-security".to_owned(), format!("{suite}-security")),
        ];
    }
    found.into_iter().map(|(uri, s)| format!("deb {uri} {s} main")).collect()
}

/// The fields of one deb822 stanza, keys lowercased; comments and continuation lines dropped.
fn deb822_fields(stanza: &str) -> BTreeMap<String, String> {
    stanza
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.starts_with('\t'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Reads `KEY=VALUE` lines; blank lines and `#` comments are skipped, and values are taken as
/// they are (no quotes, no expansion), so the files can be sourced by sh as well.
pub(crate) fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut vars = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}:{}: expected KEY=VALUE, found {line:?}", path.display(), n + 1);
        };
        ensure!(
            !value.contains(['"', '\'', '$', '`']),
            "{}:{}: values are plain text: no quotes or expansions",
            path.display(),
            n + 1
        );
        if vars.insert(key.trim().to_owned(), value.trim().to_owned()).is_some() {
            bail!("{}:{}: {} is set twice", path.display(), n + 1, key.trim());
        }
    }
    Ok(vars)
}

/// Removes the files in `dir` that `matches` selects, except `keep`: stale cache entries.
fn prune(dir: &Path, keep: &Path, matches: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path != keep && path.is_file() && !name.starts_with('.') && matches(&name) {
            println!("xtask: removing the stale cache entry {}", path.display());
            let _ = fs::remove_file(&path);
        }
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Runs a command and returns its standard output; a failure is an error with its stderr.
fn capture(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let output = cmd.stdin(Stdio::null()).output().with_context(|| format!("could not run {shown}"))?;
    if !output.status.success() {
        bail!("{shown} failed with {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    String::from_utf8(output.stdout).with_context(|| format!("{shown} printed something that is not UTF-8"))
}

/// The SHA-256 of `data` in hex, from coreutils' sha256sum.
fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run sha256sum (coreutils)")?;
    child.stdin.take().context("sha256sum has no stdin pipe")?.write_all(data).context("writing to sha256sum")?;
    let output = child.wait_with_output().context("waiting for sha256sum")?;
    ensure!(output.status.success(), "sha256sum failed with {}", output.status);
    let text = String::from_utf8_lossy(&output.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    ensure!(hex.len() == 64 && decode_hex(hex).is_ok(), "sha256sum printed {text:?}");
    Ok(hex.to_owned())
}

fn decode_hex(hex: &str) -> Result<Vec<u8>> {
    ensure!(hex.len() % 2 == 0, "odd number of hex digits");
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .with_context(|| format!("{hex:?} is not hex"))
        })
        .collect()
}

/// Standard base64 with padding, as npm writes integrity digests.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        let vectors =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn integrity_is_computed_as_npm_computes_it() {
        // `printf abc | openssl dgst -sha512 -binary | base64 -w0`
        let digest = decode_hex(concat!(
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a",
            "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        ))
        .expect("hex");
        assert_eq!(
            base64(&digest),
            "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
        );
        assert!(decode_hex("zz").is_err());
        assert!(decode_hex("abc").is_err());
    }

    #[test]
    fn sha256_hex_hashes_with_coreutils() {
        assert_eq!(
            sha256_hex(b"abc").expect("sha256sum"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn mirrors_come_from_deb822_and_one_line_sources() {
        let files = vec![
            (
                "debian.sources".to_owned(),
                "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                 Components: main\n\nTypes: deb deb-src\nURIs: http://mirror.example/debian-security\n\
                 Suites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: http://off.example\n\
                 Suites: bookworm\nEnabled: no\n"
                    .to_owned(),
            ),
            ("other.list".to_owned(), "deb [arch=amd64] https://packages.example/apt stable main\n".to_owned()),
            ("backports.list".to_owned(), "deb http://mirror.example/debian bookworm-backports main\n".to_owned()),
            ("disabled.list.disabled".to_owned(), "deb http://elsewhere.example bookworm main\n".to_owned()),
        ];
        assert_eq!(
            debian_mirrors("bookworm", &files),
            [
                "deb http://mirror.example/debian bookworm main",
                "deb http://mirror.example/debian bookworm-updates main",
                "deb http://mirror.example/debian-security bookworm-security main",
            ]
        );
        let one_line = vec![(
            "sources.list".to_owned(),
            "deb [signed-by=/k.gpg] http://m.example/d bookworm main contrib # x\n".to_owned(),
        )];
        assert_eq!(debian_mirrors("bookworm", &one_line), ["deb http://m.example/d bookworm main"]);
    }

    #[test]
    fn mirrors_fall_back_to_deb_debian_org() {
        let files = vec![("sources.list".to_owned(), "deb http://archive.ubuntu.com/ubuntu noble main\n".to_owned())];
        let mirrors = debian_mirrors("bookworm", &files);
        assert_eq!(mirrors[0], "deb http://deb.debian.org/debian bookworm main");
        assert_eq!(mirrors.len(), 3);
    }

    #[test]
    fn the_rootfs_key_covers_the_packages_and_the_agent_user() {
        let rootfs = Rootfs { suite: "bookworm".to_owned(), packages: vec!["git".to_owned(), "procps".to_owned()] };
        let args = rootfs.mmdebstrap_args();
        assert!(args.contains(&"--include=git,procps".to_owned()));
        assert!(args.iter().any(|a| a.contains(CREATE_AGENT_USER)));
        assert!(args.iter().any(|a| a.contains(CREATE_AGENT_DIRS)));
        assert_eq!(args.last().map(String::as_str), Some("bookworm"));
    }

    #[test]
    fn env_files_reject_quotes_and_duplicates() {
        let dir = std::env::temp_dir().join(format!("xtask-env-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("a.env");
        fs::write(&file, "# c\nA=1\n\nB = two words\n").expect("write");
        let vars = read_env_file(&file).expect("parses");
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("two words"));
        fs::write(&file, "A=\"1\"\n").expect("write");
        assert!(read_env_file(&file).is_err());
        fs::write(&file, "A=1\nA=2\n").expect("write");
        assert!(read_env_file(&file).is_err());
        fs::write(&file, "just words\n").expect("write");
        assert!(read_env_file(&file).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
