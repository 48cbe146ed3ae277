//! Job records in the `ty_jobs` KV bucket, keyed `<tenant>.<job>`. Every
//! write is a compare-and-set on the entry's revision: two coordinator
//! replicas applying results at once cannot lose an update.

use async_nats::jetstream::kv;
use bytes::Bytes;
use prost::Message;
use std::future::Future;
use trainyard_core::topology::{self, JOBS_BUCKET};
use trainyard_proto::v1::JobRecord;
use trainyard_proto::{JobId, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("job {0} already exists")]
    Exists(String),
    #[error("job record {0} is unreadable")]
    Corrupt(String),
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("job {0} changed too often while updating")]
    Contended(String),
}

/// A record and the revision it was read at.
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

#[derive(Clone)]
pub struct JobRepo {
    kv: kv::Store,
    js: async_nats::jetstream::Context,
}

impl JobRepo {
    pub fn new(kv: kv::Store, js: async_nats::jetstream::Context) -> Self {
        Self { kv, js }
    }

    pub async fn get(&self, tenant: &TenantId, job: &JobId) -> Result<Versioned, RepoError> {
        let key = topology::job_key(tenant, job);
        self.get_key(&key).await
    }

    async fn get_key(&self, key: &str) -> Result<Versioned, RepoError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| RepoError::NotFound(key.to_string()))?;
        let record =
            JobRecord::decode(entry.value).map_err(|_| RepoError::Corrupt(key.to_string()))?;
        Ok(Versioned {
            record,
            revision: entry.revision,
        })
    }

    /// Stores a new record; fails if the key exists.
    pub async fn create(&self, record: &JobRecord) -> Result<u64, RepoError> {
        let key = format!("{}.{}", record.tenant, record.job_id);
        match self
            .kv
            .create(&key, Bytes::from(record.encode_to_vec()))
            .await
        {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(RepoError::Exists(key)),
            Err(e) => Err(RepoError::Unavailable(e.to_string())),
        }
    }

    /// Read-modify-write with compare-and-set, retried on conflict. `change`
    /// returns the new record and a value for the caller, or `None` to leave
    /// the record alone.
    pub async fn update<T, F, Fut>(
        &self,
        tenant: &TenantId,
        job: &JobId,
        mut change: F,
    ) -> Result<(Option<JobRecord>, T), RepoError>
    where
        F: FnMut(JobRecord) -> Fut,
        Fut: Future<Output = (Option<JobRecord>, T)>,
    {
        let key = topology::job_key(tenant, job);
        for _ in 0..16 {
            let current = self.get_key(&key).await?;
            let (next, value) = change(current.record).await;
            let Some(mut next) = next else {
                return Ok((None, value));
            };
            // A final job's secrets are of use to no one: not kept, even sealed.
            if next.state().is_final()
                && let Some(spec) = next.spec.as_mut()
            {
                spec.sealed_secrets = None;
            }
            match self
                .kv
                .update(&key, Bytes::from(next.encode_to_vec()), current.revision)
                .await
            {
                Ok(_) => return Ok((Some(next), value)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(RepoError::Unavailable(e.to_string())),
            }
        }
        Err(RepoError::Contended(key))
    }

    /// Job ids of a tenant, newest first (ids sort by creation time).
    pub async fn ids_of(&self, tenant: &TenantId) -> Result<Vec<JobId>, RepoError> {
        let stream = self
            .js
            .get_stream(format!("KV_{JOBS_BUCKET}"))
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?;
        let prefix = format!("$KV.{JOBS_BUCKET}.{tenant}.");
        let mut info = stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?;
        let mut ids = Vec::new();
        use futures::TryStreamExt;
        while let Some((subject, _count)) = info
            .try_next()
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?
        {
            if let Some(id) = subject
                .strip_prefix(&prefix)
                .and_then(|s| JobId::parse(s).ok())
            {
                ids.push(id);
            }
        }
        ids.sort_by(|a, b| b.cmp(a));
        Ok(ids)
    }

    /// Every record with its revision, across tenants (for the reconciler).
    /// Every record of `tenant` (one read per job it keeps).
    pub async fn of_tenant(&self, tenant: &TenantId) -> Result<Vec<JobRecord>, RepoError> {
        let mut records = Vec::new();
        for job in self.ids_of(tenant).await? {
            match self.get(tenant, &job).await {
                Ok(found) => records.push(found.record),
                Err(RepoError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }

    pub async fn all(&self) -> Result<Vec<Versioned>, RepoError> {
        use futures::TryStreamExt;
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?
            .try_collect()
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))?;
        let mut records = Vec::new();
        for key in keys {
            match self.get_key(&key).await {
                Ok(v) => records.push(v),
                Err(RepoError::NotFound(_)) | Err(RepoError::Corrupt(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }

    /// Removes a record (and its history) if it is still at `revision`;
    /// `Ok(false)` when it changed or is gone.
    pub async fn remove(
        &self,
        tenant: &TenantId,
        job: &JobId,
        revision: u64,
    ) -> Result<bool, RepoError> {
        let key = topology::job_key(tenant, job);
        match self.kv.purge_expect_revision(&key, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::PurgeErrorKind::WrongLastRevision => Ok(false),
            // The server's "wrong last sequence" may arrive as another kind:
            // a record that moved on (or is gone) was not removed by us.
            Err(e) => match self.get_key(&key).await {
                Ok(now) if now.revision != revision => Ok(false),
                Err(RepoError::NotFound(_)) => Ok(false),
                _ => Err(RepoError::Unavailable(e.to_string())),
            },
        }
    }
}
