//! Byte-deterministic safetensors I/O.
//!
//! The `safetensors` crate serialises `__metadata__` from a `HashMap`, so two
//! identical runs would produce files whose headers differ in key order. Our
//! contract is "same config → byte-identical adapter", so we write the
//! (simple) format ourselves with sorted keys, and use the crate only for
//! reading, where it also validates what other tools produced.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, TrainerError};

/// A named f32 tensor ready to be written, or just read back.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Shape; empty for a scalar.
    pub shape: Vec<usize>,
    /// Row-major values; `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

/// Tensors keyed by name (sorted, so iteration order is stable).
pub type TensorMap = BTreeMap<String, F32Tensor>;

/// Metadata keyed by name (sorted, so the header is stable).
pub type Metadata = BTreeMap<String, String>;

/// Serialises `tensors` and `metadata` into safetensors bytes: tensors sorted by
/// name, data packed in that order, header padded with spaces to 8 bytes.
pub fn to_bytes(tensors: &TensorMap, metadata: &Metadata) -> Result<Vec<u8>> {
    let json = |s: &str| serde_json::to_string(s).map_err(|e| TrainerError::Model(e.to_string()));
    let mut header = String::from("{");
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!("{}:{}", json(k)?, json(v)?));
        }
        header.push('}');
    }
    let mut offset = 0usize;
    for (i, (name, t)) in tensors.iter().enumerate() {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(TrainerError::Model(format!(
                "tensor {name}: shape {:?} does not match {} values",
                t.shape,
                t.data.len()
            )));
        }
        if i > 0 || !metadata.is_empty() {
            header.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        let end = offset + t.data.len() * 4;
        header.push_str(&format!(
            "{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json(name)?,
            shape.join(",")
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in tensors.values() {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Writes bytes to `path` atomically: a temp file beside it, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| TrainerError::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainerError::io("cannot rename into", path, e))
}

/// Reads every tensor (converted to f32) and the metadata of a safetensors file.
/// Errors are [`TrainerError::Model`]: the caller decides what the file was.
pub fn read(path: &Path) -> Result<(TensorMap, Metadata)> {
    let bytes = std::fs::read(path)
        .map_err(|e| TrainerError::Model(format!("cannot read {}: {e}", path.display())))?;
    let bad = |e: String| {
        TrainerError::Model(format!("{} is not valid safetensors: {e}", path.display()))
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = TensorMap::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor {name} has dtype {other:?}, expected F32"
                )));
            }
        };
        tensors.insert(
            name,
            F32Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_safetensors_crate() {
        let mut tensors = TensorMap::new();
        tensors.insert(
            "b".into(),
            F32Tensor {
                shape: vec![2, 3],
                data: vec![1., 2., 3., 4., 5., 6.],
            },
        );
        tensors.insert(
            "a.alpha".into(),
            F32Tensor {
                shape: vec![],
                data: vec![4.0],
            },
        );
        let mut meta = Metadata::new();
        meta.insert("k\"ey".into(), "{\"json\": 1}".into());
        let bytes = to_bytes(&tensors, &meta).unwrap();
        assert_eq!(bytes, to_bytes(&tensors, &meta).unwrap());
        let dir = std::env::temp_dir().join(format!("ty-st-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.safetensors");
        write_atomic(&path, &bytes).unwrap();
        let (t2, m2) = read(&path).unwrap();
        assert_eq!(t2, tensors);
        assert_eq!(m2, meta);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
