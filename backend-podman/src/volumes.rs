//! Named volumes on Podman: created with the ownership labels on first use, listed and
//! removed only when owned.

use std::collections::BTreeMap;

use backend_core::{BackendError, OwnershipLabels, Result, SessionSpec, VolumeState};
use podman_api::opts::{VolumeCreateOpts, VolumeListFilter, VolumeListOpts};
use podman_api::Podman;
use time::OffsetDateTime;

use crate::error::{map_err, status_of, Subject, NAME};

/// The labels of a volume, or `None` when it does not exist.
async fn labels_of(podman: &Podman, name: &str) -> Result<Option<BTreeMap<String, String>>> {
    match podman.volumes().get(name).inspect().await {
        Ok(volume) => Ok(Some(volume.labels.into_iter().collect())),
        Err(e) if status_of(&e) == Some(containers_api::conn::hyper::StatusCode::NOT_FOUND) => Ok(None),
        Err(e) => Err(map_err(e, Subject::Other)),
    }
}

/// Creates the spec's named volumes that do not exist yet, with the ownership labels;
/// one of that name that is not ours is [`BackendError::AlreadyExists`].
pub(crate) async fn ensure(podman: &Podman, owner: &OwnershipLabels, spec: &SessionSpec) -> Result<()> {
    for volume in &spec.volumes {
        match labels_of(podman, &volume.name).await? {
            Some(labels) if owner.owns(&labels) => {}
            Some(_) => {
                return Err(BackendError::AlreadyExists {
                    backend: NAME,
                    session: volume.name.clone(),
                    detail: "a volume of that name exists and is not owned by this agentd instance".into(),
                })
            }
            None => {
                let opts = VolumeCreateOpts::builder()
                    .name(&volume.name)
                    .labels(owner.labels_for(&spec.session, &spec.agent_id))
                    .build();
                podman.volumes().create(&opts).await.map_err(|e| map_err(e, Subject::Other))?;
            }
        }
    }
    Ok(())
}

/// The owned volumes. libpod may OR several label filters, so ownership is checked
/// again on what it lists.
pub(crate) async fn list(podman: &Podman, owner: &OwnershipLabels) -> Result<Vec<VolumeState>> {
    let filters: Vec<VolumeListFilter> = owner
        .label_filters()
        .into_iter()
        .filter_map(|f| f.split_once('=').map(|(k, v)| VolumeListFilter::LabelKeyVal(k.to_owned(), v.to_owned())))
        .collect();
    let opts = VolumeListOpts::builder().filter(filters).build();
    let listed = podman.volumes().list(&opts).await.map_err(|e| map_err(e, Subject::Other))?;
    Ok(listed
        .into_iter()
        .map(|v| VolumeState {
            created_at: v
                .created_at
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()),
            labels: v.labels.into_iter().collect(),
            name: v.name,
        })
        .filter(|v| owner.owns(&v.labels))
        .collect())
}

/// Removes an owned volume; a missing or foreign one is left (success), one in use is
/// an error.
pub(crate) async fn remove(podman: &Podman, owner: &OwnershipLabels, name: &str) -> Result<()> {
    match labels_of(podman, name).await? {
        Some(labels) if owner.owns(&labels) => {}
        _ => return Ok(()),
    }
    match podman.volumes().get(name).delete().await {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(containers_api::conn::hyper::StatusCode::NOT_FOUND) => Ok(()),
        Err(e) if status_of(&e) == Some(containers_api::conn::hyper::StatusCode::CONFLICT) => {
            Err(BackendError::engine(NAME, format!("volume {name} is in use by a container")))
        }
        Err(e) => Err(map_err(e, Subject::Other)),
    }
}
