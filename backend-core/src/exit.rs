//! How a session ended.

use time::OffsetDateTime;

/// How a session's main process ended, as data.
///
/// An OOM kill is the `oom_killed` flag, never a string glued to the message. `error` is
/// the engine's own error text (for example a failed start), or a note from the backend
/// saying how it told an OOM kill (see the Podman backend).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionExitInfo {
    /// The exit code of the main process; `None` when the engine does not know it.
    pub exit_code: Option<i64>,
    /// Whether the kernel's OOM killer ended the session.
    pub oom_killed: bool,
    /// The signal that ended the process, when known (derived from codes above 128 only
    /// when the backend is sure; see [`SessionExitInfo::signal_from_code`]).
    pub signal: Option<i32>,
    /// An error reported by the engine or the backend, if any.
    pub error: Option<String>,
    /// When the session ended, if the engine recorded it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

impl SessionExitInfo {
    /// Exit info for a process that exited with `code` at `finished_at`.
    pub fn exited(code: i64, finished_at: Option<OffsetDateTime>) -> Self {
        Self { exit_code: Some(code), signal: Self::signal_from_code(code), finished_at, ..Self::default() }
    }

    /// The signal a shell-style exit code above 128 stands for (137 is SIGKILL, 143 is
    /// SIGTERM). Engines report a signalled main process this way.
    pub fn signal_from_code(code: i64) -> Option<i32> {
        (129..=128 + 64).contains(&code).then(|| (code - 128) as i32)
    }

    /// Whether the session ended successfully by itself: exit code 0 and no OOM kill.
    pub fn is_success(&self) -> bool {
        self.exit_code == Some(0) && !self.oom_killed
    }

    /// A short human summary: `exit 0`, `exit 3`, `OOM-killed (exit 137)`, `signal 9 (exit 137)`.
    pub fn summary(&self) -> String {
        let code = self.exit_code.map_or_else(|| "exit code unknown".to_owned(), |c| format!("exit {c}"));
        if self.oom_killed {
            format!("OOM-killed ({code})")
        } else if let Some(signal) = self.signal {
            format!("signal {signal} ({code})")
        } else {
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_above_128_name_the_signal() {
        assert_eq!(SessionExitInfo::exited(137, None).signal, Some(9));
        assert_eq!(SessionExitInfo::exited(143, None).signal, Some(15));
        assert_eq!(SessionExitInfo::exited(3, None).signal, None);
        assert_eq!(SessionExitInfo::exited(128, None).signal, None);
    }

    #[test]
    fn only_exit_zero_without_oom_is_success() {
        assert!(SessionExitInfo::exited(0, None).is_success());
        assert!(!SessionExitInfo::exited(2, None).is_success());
        let oom = SessionExitInfo { oom_killed: true, ..SessionExitInfo::exited(0, None) };
        assert!(!oom.is_success());
        assert_eq!(oom.summary(), "OOM-killed (exit 0)");
    }
}
