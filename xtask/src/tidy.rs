//! Repository checks that run as plain tests (`cargo test -p xtask`).

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use crate::claude_image::{Release, Rootfs, CREATE_AGENT_DIRS, CREATE_AGENT_USER};
    use crate::project_root;

    /// Parses a Dockerfile into (instruction, arguments), joining continued lines and
    /// dropping comments. Panics with the line on anything that is not an instruction.
    fn parse_dockerfile(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
                continue;
            }
            if let Some(stripped) = line.strip_suffix('\\') {
                pending.push_str(stripped);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let (instruction, args) = pending.split_once(char::is_whitespace).unwrap_or((&pending, ""));
            const KNOWN: &[&str] = &[
                "FROM",
                "ARG",
                "ADD",
                "RUN",
                "USER",
                "WORKDIR",
                "ENV",
                "HEALTHCHECK",
                "STOPSIGNAL",
                "ENTRYPOINT",
                "CMD",
                "COPY",
                "LABEL",
                "EXPOSE",
            ];
            assert!(KNOWN.contains(&instruction), "line {}: unknown instruction {instruction:?}", n + 1);
            out.push((instruction.to_owned(), args.trim().to_owned()));
            pending.clear();
        }
        assert!(pending.is_empty(), "the Dockerfile ends inside a continued line");
        out
    }

    /// The instructions of the last stage: those after the last FROM, which make the image.
    fn final_stage(instructions: &[(String, String)]) -> &[(String, String)] {
        let from = instructions.iter().rposition(|(i, _)| i == "FROM").expect("a FROM");
        &instructions[from + 1..]
    }

    /// The arguments of the last `instruction` in `stage`.
    fn last<'a>(stage: &'a [(String, String)], instruction: &str) -> Option<&'a str> {
        stage.iter().rev().find(|(i, _)| i == instruction).map(|(_, a)| a.as_str())
    }

    /// The environment that the ENV instructions of `stage` set (`K=V` pairs, no quotes).
    fn env_of(stage: &[(String, String)]) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (_, args) in stage.iter().filter(|(i, _)| i == "ENV") {
            assert!(!args.contains(['"', '\'']), "keep ENV values unquoted: {args}");
            for pair in args.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("ENV takes K=V pairs: {args}"));
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        env
    }

    /// An exec-form command (`["a", "b"]`) as its words. Panics on the shell form.
    fn exec_form(text: &str) -> Vec<String> {
        let inner = text
            .trim()
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or_else(|| panic!("use the exec form [\"...\"]: {text}"));
        inner
            .split(',')
            .map(|w| {
                let w = w.trim();
                w.strip_prefix('"')
                    .and_then(|w| w.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("{w} in {text}"))
                    .to_owned()
            })
            .collect()
    }

    /// A HEALTHCHECK's options (`--interval` and so on, in seconds or as written) and command.
    fn healthcheck(args: &str) -> (BTreeMap<String, String>, Vec<String>) {
        let (options, command) = args.split_once(" CMD ").unwrap_or_else(|| panic!("HEALTHCHECK lacks CMD: {args}"));
        let options = options
            .split_whitespace()
            .map(|o| {
                let (k, v) = o.strip_prefix("--").and_then(|o| o.split_once('=')).unwrap_or_else(|| panic!("{o}"));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        (options, exec_form(command))
    }

    /// Seconds in a Dockerfile duration such as `20s` or `1m`.
    fn seconds(duration: &str) -> u64 {
        let (number, unit) = duration.split_at(duration.find(|c: char| !c.is_ascii_digit()).unwrap_or(duration.len()));
        let number: u64 = number.parse().unwrap_or_else(|_| panic!("not a duration: {duration}"));
        match unit {
            "s" => number,
            "m" => number * 60,
            _ => panic!("write durations in s or m: {duration}"),
        }
    }

    fn claude_code_file(name: &str) -> String {
        let path = project_root().join("docker/claude-code").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The release is pinned in release.env; the registry Dockerfile's ARG defaults repeat it,
    /// and nothing else in docker/claude-code or xtask/src spells it out.
    #[test]
    fn claude_code_release_is_pinned_in_one_place() {
        let release = Release::load(&project_root().join("docker/claude-code/release.env")).expect("release.env");
        let dockerfile = parse_dockerfile(&claude_code_file("Dockerfile"));
        let args: BTreeMap<&str, &str> =
            dockerfile.iter().filter(|(i, _)| i == "ARG").filter_map(|(_, a)| a.split_once('=')).collect();
        for (name, pinned) in [
            ("CLAUDE_CODE_VERSION", &release.version),
            ("CLAUDE_CODE_PACKAGE", &release.package),
            ("CLAUDE_CODE_INTEGRITY", &release.integrity),
        ] {
            assert_eq!(
                args.get(name).copied(),
                Some(pinned.as_str()),
                "ARG {name} in Dockerfile must equal release.env"
            );
        }
        for dir in ["docker/claude-code", "xtask/src"] {
            let entries = std::fs::read_dir(project_root().join(dir)).expect("read_dir");
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == "release.env" || name == "Dockerfile" {
                    continue;
                }
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                assert!(
                    !text.contains(&release.version) && !text.contains(&release.integrity),
                    "{dir}/{name} repeats the pinned release: refer to release.env instead"
                );
            }
        }
    }

    /// Dockerfile (for hosts with a registry) and Dockerfile.offline (what `cargo xtask images`
    /// builds) give the same image: a non-root user with a writable HOME, the same workdir,
    /// environment, health check and command, and no entrypoint.
    #[test]
    fn claude_code_dockerfiles_give_the_same_image() {
        let online = parse_dockerfile(&claude_code_file("Dockerfile"));
        let offline = parse_dockerfile(&claude_code_file("Dockerfile.offline"));
        for (name, file) in [("Dockerfile", &online), ("Dockerfile.offline", &offline)] {
            assert!(
                !file.iter().any(|(i, _)| i == "ENTRYPOINT"),
                "{name}: agentd passes the whole command, no ENTRYPOINT"
            );
            let stage = final_stage(file);
            assert_eq!(last(stage, "USER"), Some("1000:1000"), "{name}: the agent runs as uid 1000, gid 1000");
            assert_eq!(last(stage, "WORKDIR"), Some("/workspace"), "{name}");
            let env = env_of(stage);
            for (key, value) in [
                ("HOME", "/home/agent"),
                ("DISABLE_AUTOUPDATER", "1"),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ] {
                assert_eq!(env.get(key).map(String::as_str), Some(value), "{name}: ENV {key}");
            }
            assert!(env.get("PATH").is_some_and(|p| p.split(':').any(|d| d == "/usr/local/bin")), "{name}: PATH");
            let copied = stage.iter().filter(|(i, _)| i == "COPY").any(|(_, a)| a.ends_with(" /usr/local/bin/claude"));
            assert!(copied, "{name}: claude goes to /usr/local/bin/claude");

            let check = last(stage, "HEALTHCHECK").unwrap_or_else(|| panic!("{name}: HEALTHCHECK"));
            let (options, command) = healthcheck(check);
            let interval = seconds(options.get("interval").expect("--interval"));
            let start_period = seconds(options.get("start-period").expect("--start-period"));
            assert!((5..=30).contains(&interval), "{name}: check every 5 to 30 s, not {interval} s");
            assert!(start_period >= 1, "{name}: Docker 20.10 rejects a start period of 0 s");
            assert!(seconds(options.get("timeout").expect("--timeout")) < interval, "{name}: timeout below interval");
            assert!(options.get("retries").is_some_and(|r| r.parse::<u32>().is_ok_and(|r| r >= 1)), "{name}");
            assert_eq!(command.first().map(String::as_str), Some("pgrep"), "{name}: the check looks for the process");
            assert!(command.iter().any(|w| w == "claude"), "{name}: the check looks for claude");
            assert!(!command.iter().any(|w| w == "-f"), "{name}: `pgrep -f` also matches a shell wrapping the check");
        }

        let (online_stage, offline_stage) = (final_stage(&online), final_stage(&offline));
        for instruction in ["USER", "WORKDIR", "HEALTHCHECK", "STOPSIGNAL", "CMD"] {
            assert_eq!(
                last(online_stage, instruction),
                last(offline_stage, instruction),
                "{instruction} differs between Dockerfile and Dockerfile.offline"
            );
        }
        assert_eq!(
            env_of(online_stage),
            env_of(offline_stage),
            "ENV differs between Dockerfile and Dockerfile.offline"
        );
        assert_eq!(exec_form(last(offline_stage, "CMD").expect("CMD")), ["claude", "--version"]);
    }

    /// The offline image is assembled from the generated context; the registry image makes the
    /// same root filesystem: the Debian suite and packages of rootfs.env, the same agent user.
    #[test]
    fn claude_code_images_share_the_root_filesystem_recipe() {
        let rootfs = Rootfs::load(&project_root().join("docker/claude-code/rootfs.env")).expect("rootfs.env");
        let offline = parse_dockerfile(&claude_code_file("Dockerfile.offline"));
        assert_eq!(offline[0], ("FROM".to_owned(), "scratch".to_owned()));
        assert_eq!(offline[1], ("ADD".to_owned(), "rootfs.tar /".to_owned()));
        assert!(offline.contains(&("COPY".to_owned(), "claude /usr/local/bin/claude".to_owned())));

        let online = parse_dockerfile(&claude_code_file("Dockerfile"));
        let from = online.iter().rev().find(|(i, _)| i == "FROM").map(|(_, a)| a.as_str());
        assert_eq!(
            from,
            Some(format!("debian:{}-slim", rootfs.suite).as_str()),
            "Dockerfile's base is rootfs.env's suite"
        );
        let runs: Vec<&str> =
            final_stage(&online).iter().filter(|(i, _)| i == "RUN").map(|(_, a)| a.as_str()).collect();
        let installed: BTreeSet<&str> = runs
            .iter()
            .filter_map(|r| r.split_once("apt-get install").map(|(_, rest)| rest))
            .flat_map(|rest| rest.split("&&").next().unwrap_or_default().split_whitespace())
            .filter(|w| !w.starts_with('-'))
            .collect();
        let wanted: BTreeSet<&str> = rootfs.packages.iter().map(String::as_str).collect();
        assert_eq!(installed, wanted, "Dockerfile installs other packages than rootfs.env names");
        for command in [CREATE_AGENT_USER, CREATE_AGENT_DIRS] {
            assert!(runs.iter().any(|r| r.contains(command)), "Dockerfile must run `{command}` as the rootfs does");
        }
    }

    #[test]
    fn echo_agent_dockerfile_is_from_scratch_with_a_healthcheck() {
        let text = std::fs::read_to_string(project_root().join("docker/echo-agent/Dockerfile")).expect("read");
        let instructions = parse_dockerfile(&text);
        assert_eq!(instructions[0], ("FROM".to_owned(), "scratch".to_owned()));
        assert!(instructions.iter().any(|(i, a)| i == "HEALTHCHECK" && a.contains("--health")));
    }

    #[test]
    fn the_dockerfile_parser_rejects_garbage() {
        let outcome = std::panic::catch_unwind(|| parse_dockerfile("FROM x\nBOGUS y\n"));
        assert!(outcome.is_err());
    }

    /// Tests are never ignored up front: a test that cannot run fails, or skips at run time
    /// with a reason.
    #[test]
    fn no_test_is_ignored() {
        let mut offenders = Vec::new();
        visit(&project_root(), &mut offenders);
        assert!(offenders.is_empty(), "ignored tests found in: {offenders:?}");
    }

    fn visit(dir: &Path, offenders: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    visit(&path, offenders);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // The attribute, and its twin in the conformance harness (libtest-mimic).
                let needles = [concat!("#[", "ignore"), concat!("with_ignored", "_flag(")];
                if needles.iter().any(|needle| text.contains(needle)) {
                    offenders.push(path.display().to_string());
                }
            }
        }
    }
}
