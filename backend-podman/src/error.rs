//! Mapping podman-api's errors into backend-core's.

use backend_core::BackendError;
use containers_api::conn::hyper::StatusCode;
use podman_api::Error as PodmanError;

pub(crate) const NAME: &str = "podman";

/// What an engine call was about, for the error it maps to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// A call on an existing session (container).
    Session(&'a str),
    /// Creating a session from an image.
    Create { session: &'a str, image: &'a str },
    /// A call about an image.
    Image(&'a str),
    /// Anything else (listings, networks, system calls).
    Other,
}

/// libpod's causes for a missing image and a taken name. libpod 4.3 answers a create
/// with either with status 500, so the cause decides.
const IMAGE_MISSING: [&str; 3] = ["image not known", "failed to find image", "no such image"];
const NAME_TAKEN: &str = "already in use";

/// Maps a podman-api error: connection failures are `Unavailable` (never "not found");
/// 404 is `NotFound` or `ImageNotFound` by subject; 409 (and libpod's 500 "name already
/// in use" on create) is `AlreadyExists`; the rest is `Engine`.
pub(crate) fn map_err(err: PodmanError, subject: Subject<'_>) -> BackendError {
    match &err {
        PodmanError::Fault { code, message } => {
            let lower = message.to_ascii_lowercase();
            let image_missing = IMAGE_MISSING.iter().any(|m| lower.contains(m));
            match (*code, subject) {
                (StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT, _) => {
                    unavailable(err)
                }
                (_, Subject::Create { image, .. }) if image_missing => {
                    BackendError::ImageNotFound { backend: NAME, image: image.to_owned() }
                }
                (StatusCode::NOT_FOUND, Subject::Image(image)) => {
                    BackendError::ImageNotFound { backend: NAME, image: image.to_owned() }
                }
                (StatusCode::NOT_FOUND, Subject::Session(session) | Subject::Create { session, .. }) => {
                    BackendError::NotFound { backend: NAME, session: session.to_owned() }
                }
                (StatusCode::CONFLICT, Subject::Session(session) | Subject::Create { session, .. }) => {
                    BackendError::AlreadyExists { backend: NAME, session: session.to_owned(), detail: message.clone() }
                }
                (_, Subject::Create { session, .. }) if lower.contains(NAME_TAKEN) => {
                    BackendError::AlreadyExists { backend: NAME, session: session.to_owned(), detail: message.clone() }
                }
                (
                    StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY,
                    Subject::Image(_) | Subject::Create { .. },
                ) => BackendError::Rejected { backend: NAME, message: message.clone() },
                _ => engine(err),
            }
        }
        PodmanError::Error(_)
        | PodmanError::IO(_)
        | PodmanError::UnsupportedScheme(_)
        | PodmanError::MissingAuthority
        | PodmanError::InvalidUrl(_)
        | PodmanError::InvalidPort(_)
        | PodmanError::InvalidProtocol(_) => unavailable(err),
        _ => engine(err),
    }
}

/// The status code of an engine answer, if the error is one.
pub(crate) fn status_of(err: &PodmanError) -> Option<StatusCode> {
    match err {
        PodmanError::Fault { code, .. } => Some(*code),
        _ => None,
    }
}

fn unavailable(err: PodmanError) -> BackendError {
    BackendError::Unavailable { backend: NAME, message: err.to_string(), source: Some(Box::new(err)) }
}

fn engine(err: PodmanError) -> BackendError {
    BackendError::Engine { backend: NAME, message: err.to_string(), source: Some(Box::new(err)) }
}

/// The error for an engine call that did not answer within `limit`.
pub(crate) fn timed_out(what: &str, limit: std::time::Duration) -> BackendError {
    BackendError::unavailable(NAME, format!("Podman did not answer {what} within {limit:?}"))
}

#[cfg(test)]
mod tests {
    use containers_api::conn::Error as ConnError;

    use super::*;

    fn fault(code: u16, message: &str) -> PodmanError {
        PodmanError::Fault { code: StatusCode::from_u16(code).expect("status"), message: message.into() }
    }

    #[test]
    fn an_unreachable_engine_is_never_a_missing_session() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(map_err(PodmanError::Error(ConnError::IO(refused)), Subject::Session("s")).is_retryable());
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(map_err(PodmanError::IO(gone), Subject::Session("s")).is_retryable());
        assert!(map_err(fault(503, "restarting"), Subject::Session("s")).is_retryable());
        assert!(!map_err(fault(503, "x"), Subject::Session("s")).is_not_found());
        assert!(timed_out("inspect", std::time::Duration::from_secs(1)).is_retryable());
    }

    #[test]
    fn not_found_depends_on_the_subject() {
        let missing = "no container with name or ID \"s\" found: no such container";
        assert!(map_err(fault(404, missing), Subject::Session("s")).is_not_found());
        assert!(matches!(
            map_err(fault(404, "failed to find image i: failed to find image i"), Subject::Image("i")),
            BackendError::ImageNotFound { image, .. } if image == "i"
        ));
        assert!(matches!(map_err(fault(500, "boom"), Subject::Session("s")), BackendError::Engine { .. }));
        assert!(matches!(map_err(fault(404, "x"), Subject::Other), BackendError::Engine { .. }));
    }

    #[test]
    fn create_errors_name_the_image_or_the_conflict() {
        let create = Subject::Create { session: "s", image: "img:1" };
        assert!(matches!(
            map_err(fault(500, "img:1: image not known: image not known"), create),
            BackendError::ImageNotFound { image, .. } if image == "img:1"
        ));
        let taken = "creating container storage: the container name \"s\" is already in use by 1234: that name is already in use";
        assert!(
            matches!(map_err(fault(500, taken), create), BackendError::AlreadyExists { session, .. } if session == "s")
        );
        assert!(matches!(map_err(fault(409, "conflict"), Subject::Session("s")), BackendError::AlreadyExists { .. }));
        assert!(matches!(map_err(fault(400, "invalid cpus"), create), BackendError::Rejected { .. }));
        assert!(matches!(map_err(fault(400, "x"), Subject::Session("s")), BackendError::Engine { .. }));
    }
}
