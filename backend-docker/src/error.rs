//! Mapping bollard's errors into backend-core's.

use backend_core::BackendError;
use bollard::errors::Error as DockerError;

pub(crate) const NAME: &str = "docker";

/// What an engine call was about, for the error it maps to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    Session(&'a str),
    Image(&'a str),
    Other,
}

/// Maps a bollard error: connection failures and timeouts are `Unavailable` (never "not
/// found"); 404 is `NotFound` or `ImageNotFound` by subject; 400 about a session or an
/// image is `Rejected` (the client's input); the rest is `Engine`.
pub(crate) fn map_err(err: DockerError, subject: Subject<'_>) -> BackendError {
    match &err {
        DockerError::DockerResponseServerError { status_code: 404, message } => match subject {
            Subject::Image(image) => BackendError::ImageNotFound { backend: NAME, image: image.to_owned() },
            Subject::Session(_) if message.contains("No such image") => BackendError::ImageNotFound {
                backend: NAME,
                image: message.trim_start_matches("No such image: ").to_owned(),
            },
            Subject::Session(session) => BackendError::NotFound { backend: NAME, session: session.to_owned() },
            Subject::Other => engine(err),
        },
        DockerError::DockerResponseServerError { status_code: 409, message } => match subject {
            Subject::Session(session) => {
                BackendError::AlreadyExists { backend: NAME, session: session.to_owned(), detail: message.clone() }
            }
            _ => engine(err),
        },
        DockerError::DockerResponseServerError { status_code: 400 | 422, message }
            if matches!(subject, Subject::Session(_) | Subject::Image(_)) =>
        {
            BackendError::Rejected { backend: NAME, message: message.clone() }
        }
        DockerError::IOError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::SocketNotFoundError(_)
        | DockerError::HyperLegacyError { .. } => {
            BackendError::Unavailable { backend: NAME, message: err.to_string(), source: Some(Box::new(err)) }
        }
        DockerError::DockerResponseServerError { status_code: 502..=504, .. } => {
            BackendError::Unavailable { backend: NAME, message: err.to_string(), source: Some(Box::new(err)) }
        }
        _ => engine(err),
    }
}

fn engine(err: DockerError) -> BackendError {
    BackendError::Engine { backend: NAME, message: err.to_string(), source: Some(Box::new(err)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16, message: &str) -> DockerError {
        DockerError::DockerResponseServerError { status_code, message: message.into() }
    }

    #[test]
    fn an_unreachable_engine_is_never_a_missing_session() {
        let io = DockerError::IOError { err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused) };
        assert!(map_err(io, Subject::Session("s")).is_retryable());
        assert!(map_err(DockerError::RequestTimeoutError, Subject::Session("s")).is_retryable());
        assert!(map_err(DockerError::SocketNotFoundError("/x".into()), Subject::Session("s")).is_retryable());
    }

    #[test]
    fn not_found_depends_on_the_subject() {
        assert!(map_err(server(404, "No such container: s"), Subject::Session("s")).is_not_found());
        assert!(matches!(
            map_err(server(404, "No such image: img:1"), Subject::Session("s")),
            BackendError::ImageNotFound { image, .. } if image == "img:1"
        ));
        assert!(matches!(map_err(server(404, "x"), Subject::Image("i")), BackendError::ImageNotFound { .. }));
        assert!(matches!(map_err(server(409, "conflict"), Subject::Session("s")), BackendError::AlreadyExists { .. }));
        assert!(matches!(map_err(server(500, "boom"), Subject::Session("s")), BackendError::Engine { .. }));
    }

    #[test]
    fn a_refused_value_is_the_clients_mistake() {
        let cpus = "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available";
        assert!(matches!(
            map_err(server(400, cpus), Subject::Session("s")),
            BackendError::Rejected { message, .. } if message == cpus
        ));
        assert!(matches!(
            map_err(server(400, "invalid reference format"), Subject::Image("a|b")),
            BackendError::Rejected { .. }
        ));
        assert!(matches!(map_err(server(400, "x"), Subject::Other), BackendError::Engine { .. }));
    }
}
