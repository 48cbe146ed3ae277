//! GPU utilisation through NVML, for the stuck watchdog: a trainer whose
//! GPUs stay idle for a long time has hung (a deadlocked collective, a
//! dataloader that never returns) even if it still prints. NVML is loaded
//! at run time, so a machine without an NVIDIA driver simply has no probe
//! and the check is off.

use nvml_wrapper::Nvml;
use std::sync::Arc;

/// This machine's GPUs as NVML sees them, or none.
#[derive(Clone, Default)]
pub struct Gpus {
    nvml: Option<Arc<Nvml>>,
}

impl Gpus {
    /// Loads NVML once; absent when the library or a driver is missing.
    pub fn probe() -> Self {
        match Nvml::init() {
            Ok(nvml) => {
                tracing::info!(
                    devices = nvml.device_count().unwrap_or(0),
                    "NVML present: GPU idle check on"
                );
                Self {
                    nvml: Some(Arc::new(nvml)),
                }
            }
            Err(error) => {
                tracing::info!(%error, "NVML absent: GPU idle check off");
                Self::default()
            }
        }
    }

    pub fn present(&self) -> bool {
        self.nvml.is_some()
    }

    /// The highest GPU utilisation, in percent, over `devices` (every
    /// device when empty); `None` when NVML is absent or cannot answer.
    pub async fn busiest(&self, devices: &[u32]) -> Option<u32> {
        let nvml = self.nvml.clone()?;
        let devices = devices.to_vec();
        // NVML calls block (a driver round trip each).
        tokio::task::spawn_blocking(move || {
            let all: Vec<u32> = if devices.is_empty() {
                (0..nvml.device_count().ok()?).collect()
            } else {
                devices
            };
            all.into_iter()
                .filter_map(|i| nvml.device_by_index(i).ok()?.utilization_rates().ok())
                .map(|u| u.gpu)
                .max()
        })
        .await
        .ok()
        .flatten()
    }
}

/// The device indices of a `CUDA_VISIBLE_DEVICES` value; empty (every
/// device) when unset or not plain indices (UUIDs).
pub fn visible_devices(value: Option<&str>) -> Vec<u32> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Vec::new();
    };
    value
        .split(',')
        .map(|d| d.trim().parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_devices_are_parsed_or_all() {
        assert_eq!(visible_devices(Some("0, 2")), vec![0, 2]);
        assert!(visible_devices(Some("GPU-1a2b")).is_empty());
        assert!(visible_devices(None).is_empty());
    }

    #[tokio::test]
    async fn without_a_driver_the_probe_is_absent_and_answers_nothing() {
        // Machines without NVML (CI) must degrade to "absent", never fail.
        let gpus = Gpus::probe();
        if !gpus.present() {
            assert_eq!(gpus.busiest(&[]).await, None);
        }
        assert_eq!(Gpus::default().busiest(&[0]).await, None);
    }
}
