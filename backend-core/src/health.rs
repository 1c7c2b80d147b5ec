//! Health of a running session.

use std::fmt;
use std::str::FromStr;

/// The health of a session as its engine reports it.
///
/// A session without a configured health check reads `Healthy` while it runs; a session
/// that is not running reads `Unknown` (engines keep reporting the last probe result of a
/// stopped container, which means nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SessionHealth {
    /// The health check passes.
    Healthy,
    /// The health check has failed as many times in a row as the check allows.
    Unhealthy,
    /// The health check has not passed yet, within its start period.
    Starting,
    /// Health cannot be told: the session is not running, or the backend cannot check.
    #[default]
    Unknown,
}

impl SessionHealth {
    /// The snake_case name used in JSON, the database and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Starting => "starting",
            Self::Unknown => "unknown",
        }
    }

    /// Every variant, in declaration order.
    pub const ALL: [SessionHealth; 4] = [Self::Healthy, Self::Unhealthy, Self::Starting, Self::Unknown];
}

impl fmt::Display for SessionHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text given to [`SessionHealth::from_str`] names no health.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown health {0:?}; expected one of: healthy, unhealthy, starting, unknown")]
pub struct ParseHealthError(pub String);

impl FromStr for SessionHealth {
    type Err = ParseHealthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| ParseHealthError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_round_trips_through_text_and_json() {
        for health in SessionHealth::ALL {
            assert_eq!(health.to_string().parse::<SessionHealth>(), Ok(health));
            let json = serde_json::to_string(&health).expect("serialize");
            assert_eq!(json, format!("\"{health}\""));
            assert_eq!(serde_json::from_str::<SessionHealth>(&json).expect("deserialize"), health);
        }
    }

    #[test]
    fn unknown_health_text_is_rejected_with_the_allowed_values() {
        let err = "Healthy".parse::<SessionHealth>().expect_err("case matters");
        assert!(err.to_string().contains("expected one of"), "{err}");
    }
}
