//! What a run leaves in the store besides its checkpoints: the final
//! adapter (the job's output) and the trainer's whole output as a log
//! artifact, stored however the run ended.

use super::lock;
use super::supervise::Run;
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;
use tracing::field::Empty;
use trainyard_core::runtime::StageError;
use trainyard_core::store::keys;
use trainyard_proto::v1::Artifact;

/// How long storing an attempt's trainer log may take before it is given up.
const LOG_UPLOAD: Duration = Duration::from_secs(60);

impl Run<'_> {
    /// Stores the final adapter under the job's output folder.
    pub(super) async fn store_adapter(&self, adapter: &Path) -> Result<Artifact, StageError> {
        let name = adapter
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "lora.safetensors".into());
        let key = keys::output_file(&self.ctx.meta.tenant, &self.ctx.meta.job, &name);
        let span = tracing::info_span!(
            "train.adapter.upload",
            trainyard.job.id = %self.ctx.meta.job,
            bytes = Empty,
        );
        let artifact = self
            .stage
            .store
            .put_file(adapter, &key)
            .instrument(span.clone())
            .await
            .map_err(StageError::from)?;
        span.record("bytes", artifact.size);
        Ok(artifact)
    }

    /// Stores the trainer's output of this run at
    /// `tenants/<tenant>/jobs/<job>/logs/train-attempt-<a>-delivery-<d>.log` and says where
    /// in a log event; trouble is logged, never the run's result.
    pub(super) async fn store_log(&self) {
        let Some(log) = lock(&self.log).take() else {
            return;
        };
        let job = &self.ctx.meta.job;
        let key = keys::train_log(
            &self.ctx.meta.tenant,
            job,
            self.ctx.meta.attempt.0,
            self.ctx.delivered,
        );
        let span = tracing::info_span!(
            "train.log.upload",
            trainyard.job.id = %job,
            bytes = Empty,
            truncated = Empty,
        );
        let stored = async {
            let finished = tokio::task::spawn_blocking(move || log.finish())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let artifact = self
                .stage
                .store
                .put_file(&finished.path, &key)
                .await
                .map_err(|e| e.to_string())?;
            let span = tracing::Span::current();
            span.record("bytes", artifact.size);
            span.record("truncated", finished.truncated);
            Ok::<_, String>((artifact, finished))
        }
        .instrument(span);
        match tokio::time::timeout(LOG_UPLOAD, stored).await {
            Ok(Ok((artifact, finished))) => {
                tracing::info!(%job, key, bytes = artifact.size, "trainer log stored");
                let cut = match finished.truncated {
                    true => format!(", the last part of {} bytes", finished.total),
                    false => String::new(),
                };
                self.logs.note(&format!(
                    "trainer output stored at {} ({} bytes{cut})",
                    artifact.uri, artifact.size
                ));
            }
            Ok(Err(error)) => {
                tracing::warn!(%job, key, %error, "cannot store the trainer log");
            }
            Err(_) => tracing::warn!(%job, key, "storing the trainer log took too long; given up"),
        }
    }
}
