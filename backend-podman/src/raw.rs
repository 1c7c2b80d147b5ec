//! The two libpod calls podman-api 0.11 cannot make as libpod 4.3 expects them, sent over
//! podman-api's own transport (containers-api) to the same service.
//!
//! - **Create.** podman-api's `ContainerCreateOpts` spells the no-new-privileges field
//!   `no_new_privilages`, which libpod ignores, and its log configuration is Docker-shaped
//!   (`Type`/`Config`) where libpod's SpecGenerator wants `driver`/`size`. The backend
//!   builds the SpecGenerator JSON itself (`convert::create_body`) and posts it here.
//! - **Stop.** podman-api sends the grace period as `Timeout=`; libpod only reads
//!   `timeout=` and otherwise waits the container's stop timeout (10 s by default).

use std::future::Future;
use std::pin::Pin;

use containers_api::conn::hyper::{self, Body, Response, StatusCode};
use containers_api::conn::{get_http_connector, Headers, Payload, RequestClient, Transport};
use podman_api::Error as PodmanError;

/// A libpod client for the calls podman-api gets wrong. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Libpod {
    client: RequestClient<PodmanError>,
    /// The versioned path prefix podman-api uses too (`/v4.3.1`).
    prefix: String,
}

/// What a stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The container was running and is stopped now.
    Now,
    /// The container was not running (libpod answers 304).
    Already,
}

impl Libpod {
    /// A client for `address` (`unix://PATH`, `tcp://HOST:PORT`, `http://HOST:PORT`).
    pub(crate) fn new(address: &str) -> Result<Self, PodmanError> {
        let transport = match address.split_once("://") {
            Some(("unix", path)) if !path.is_empty() => Transport::Unix {
                client: hyper::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build(containers_api::conn::get_unix_connector()),
                path: path.into(),
            },
            Some(("tcp" | "http", host)) if !host.is_empty() => Transport::Tcp {
                client: hyper::Client::builder().build(get_http_connector()),
                host: containers_api::url::url::Url::parse(&format!("tcp://{host}"))
                    .map_err(PodmanError::InvalidUrl)?,
            },
            Some((_, "")) => return Err(PodmanError::MissingAuthority),
            Some((scheme, _)) => return Err(PodmanError::UnsupportedScheme(scheme.to_owned())),
            None => return Err(PodmanError::UnsupportedScheme(address.to_owned())),
        };
        Ok(Self {
            client: RequestClient::new(transport, Box::new(validate)),
            prefix: format!("/v{}", podman_api::LATEST_API_VERSION),
        })
    }

    /// `POST /libpod/containers/create` with a SpecGenerator body; returns the new id.
    pub(crate) async fn create(&self, spec: &serde_json::Value) -> Result<String, PodmanError> {
        let body = serde_json::to_vec(spec)?;
        let created: podman_api::models::ContainerCreateCreatedBody = self
            .client
            .post_json(format!("{}/libpod/containers/create", self.prefix), Payload::Json(body), Headers::none())
            .await?;
        Ok(created.id)
    }

    /// `POST /libpod/containers/{id}/stop?timeout=SECS`: SIGTERM (the container's stop
    /// signal), then SIGKILL after `timeout_secs`.
    pub(crate) async fn stop(&self, id: &str, timeout_secs: u64) -> Result<Stopped, PodmanError> {
        let endpoint = format!("{}/libpod/containers/{id}/stop?timeout={timeout_secs}", self.prefix);
        let response = self.client.post(endpoint, Payload::empty(), Headers::none()).await?;
        Ok(if response.status() == StatusCode::NOT_MODIFIED { Stopped::Already } else { Stopped::Now })
    }
}

type Validated = Pin<Box<dyn Future<Output = Result<Response<Body>, PodmanError>> + Send + Sync>>;

/// Passes successful answers (and 304, "nothing to do") on; turns the rest into
/// `Error::Fault` with libpod's `message: cause`, as podman-api does.
fn validate(response: Response<Body>) -> Validated {
    Box::pin(async move {
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        let bytes = hyper::body::to_bytes(response.into_body()).await.map_err(containers_api::conn::Error::from)?;
        Err(PodmanError::Fault { code: status, message: fault_message(status, &bytes) })
    })
}

/// libpod's error body `{"cause": ..., "message": ..., "response": ...}` as one line.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::from_utf8_lossy(body).trim().to_owned();
    };
    let field = |name: &str| parsed.get(name).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
    match (field("message"), field("cause")) {
        (m, c) if m.is_empty() && c.is_empty() => status.canonical_reason().unwrap_or("unknown error").to_owned(),
        (m, c) if c.is_empty() || m.ends_with(&c) => m,
        (m, c) => format!("{m}: {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_messages_keep_libpods_cause() {
        let body = br#"{"cause":"image not known","message":"img: image not known","response":500}"#;
        assert_eq!(fault_message(StatusCode::INTERNAL_SERVER_ERROR, body), "img: image not known");
        let body =
            br#"{"cause":"no such container","message":"no container with name or ID \"x\" found","response":404}"#;
        assert_eq!(
            fault_message(StatusCode::NOT_FOUND, body),
            "no container with name or ID \"x\" found: no such container"
        );
        assert_eq!(fault_message(StatusCode::BAD_GATEWAY, b"proxy down\n"), "proxy down");
    }

    #[test]
    fn only_known_schemes_are_accepted() {
        assert!(Libpod::new("unix:///run/podman/podman.sock").is_ok());
        assert!(Libpod::new("tcp://127.0.0.1:8080").is_ok());
        assert!(matches!(Libpod::new("ssh://host"), Err(PodmanError::UnsupportedScheme(s)) if s == "ssh"));
        assert!(matches!(Libpod::new("unix://"), Err(PodmanError::MissingAuthority)));
    }
}
