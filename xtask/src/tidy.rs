//! Repository checks that run as plain tests (`cargo test -p xtask`).

#[cfg(test)]
mod tests {
    use std::path::Path;

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

    #[test]
    fn claude_code_dockerfile_runs_as_non_root_with_a_healthcheck() {
        let path = project_root().join("docker/claude-code/Dockerfile");
        let text = std::fs::read_to_string(&path).expect("read the Claude Code Dockerfile");
        let instructions = parse_dockerfile(&text);
        assert_eq!(instructions.first().map(|(i, _)| i.as_str()), Some("FROM"));
        let user = instructions.iter().rev().find(|(i, _)| i == "USER").map(|(_, a)| a.as_str());
        assert!(
            matches!(user, Some(u) if u != "root" && u != "0" && !u.starts_with("0:")),
            "last USER must be non-root: {user:?}"
        );
        assert!(text.contains("uid 1000") || text.contains("1000"), "the agent user is uid 1000");
        let check =
            instructions.iter().find(|(i, _)| i == "HEALTHCHECK").map(|(_, a)| a.as_str()).expect("HEALTHCHECK");
        for flag in ["--interval=30s", "--timeout=5s", "--start-period=10s", "--retries=3"] {
            assert!(check.contains(flag), "HEALTHCHECK lacks {flag}: {check}");
        }
        let workdir = instructions.iter().rev().find(|(i, _)| i == "WORKDIR").map(|(_, a)| a.as_str());
        assert_eq!(workdir, Some("/workspace"));
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

    /// Tests are never ignored: a test that cannot run fails or skips with a reason.
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
                let needle = concat!("#[", "ignore");
                if text.contains(needle) {
                    offenders.push(path.display().to_string());
                }
            }
        }
    }
}
