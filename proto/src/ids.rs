//! Typed ids. A job id, a tenant id and an attempt number are not
//! interchangeable strings: they end up in NATS subjects and KV keys, so each
//! constructor checks the characters those allow.

use std::fmt;
use std::sync::Arc;

/// Why a string is not a valid id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} may hold only ascii letters, digits, '-' and '_'")]
    BadCharacter { what: &'static str },
}

fn check(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > max {
        return Err(IdError::TooLong { what, max });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError::BadCharacter { what });
    }
    Ok(())
}

/// A job's id: `j-` and a UUIDv7 in hex, so ids sort by creation time.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Arc<str>);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(format!("j-{}", uuid::Uuid::now_v7().simple()).into())
    }

    /// Checks an id that came from outside (a request, a message).
    pub fn parse(value: &str) -> Result<Self, IdError> {
        check("job id", value, 64)?;
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant: the owner of jobs, from the caller's bearer token.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        check("tenant", value, 64)?;
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Attempt number of a stage, from 1. It rises each time the coordinator
/// hands the stage out again; JetStream redeliveries keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attempt(pub u32);

macro_rules! string_id_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), &*self.0)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
string_id_impls!(JobId);
string_id_impls!(TenantId);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_job_ids_parse_and_sort_by_time() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_eq!(JobId::parse(a.as_str()).unwrap(), a);
        assert!(a < b);
    }

    #[test]
    fn ids_refuse_subject_characters() {
        assert_eq!(
            JobId::parse("a.b"),
            Err(IdError::BadCharacter { what: "job id" })
        );
        assert_eq!(
            TenantId::parse("a*"),
            Err(IdError::BadCharacter { what: "tenant" })
        );
        assert_eq!(TenantId::parse(""), Err(IdError::Empty { what: "tenant" }));
        assert!(TenantId::parse(&"x".repeat(65)).is_err());
    }
}
