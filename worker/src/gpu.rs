//! GPU utilisation through NVML, for the stuck watchdog: a trainer whose
//! GPUs stay idle for a long time has hung (a deadlocked collective, a
//! dataloader that never returns) even if it still prints. NVML is loaded
//! at run time, so a machine without an NVIDIA driver simply has no probe
//! and the check is off.
//!
//! The same probe feeds the GPU gauges ([`sampler`]): every
//! `[worker] gpu_sample_ms`, each device's utilisation and memory go to
//! `trainyard_gpu_*`. Without NVML there is no sampler and no GPU series.

use nvml_wrapper::Nvml;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trainyard_backends::Slot;
use trainyard_core::telemetry::metrics::GpuSample;

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

    /// How many devices NVML sees; 0 without NVML.
    pub fn count(&self) -> u32 {
        self.nvml
            .as_ref()
            .and_then(|nvml| nvml.device_count().ok())
            .unwrap_or(0)
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

/// One device's NVML reading as the metrics carry it (utilisation from
/// percent to a 0–1 fraction).
pub fn gpu_sample(
    index: u32,
    name: String,
    memory_used: u64,
    memory_total: u64,
    utilization_percent: u32,
) -> GpuSample {
    GpuSample {
        index,
        name,
        memory_used_bytes: memory_used,
        memory_total_bytes: memory_total,
        utilization: f64::from(utilization_percent.min(100)) / 100.0,
    }
}

impl Gpus {
    /// Every device's reading; empty without NVML. Devices that cannot be
    /// read are left out.
    pub async fn read(&self) -> Vec<GpuSample> {
        let Some(nvml) = self.nvml.clone() else {
            return Vec::new();
        };
        tokio::task::spawn_blocking(move || {
            let count = nvml.device_count().unwrap_or(0);
            (0..count)
                .filter_map(|index| {
                    let device = nvml.device_by_index(index).ok()?;
                    let memory = device.memory_info().ok()?;
                    let busy = device.utilization_rates().ok()?.gpu;
                    Some(gpu_sample(
                        index,
                        device.name().unwrap_or_default(),
                        memory.used,
                        memory.total,
                        busy,
                    ))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }
}

/// Reads the GPUs every `every` until `stop`, handing each reading to
/// `record` (the worker: `Metrics::set_gpus`), and an empty one at the end;
/// `None` (and one info line) without NVML or with `every` zero: no GPU
/// series at all.
pub fn sampler(
    gpus: &Gpus,
    every: Duration,
    record: impl Fn(Vec<GpuSample>) + Send + Sync + 'static,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    if !gpus.present() || every.is_zero() {
        tracing::info!(
            nvml = gpus.present(),
            "GPU metrics off: no NVML or gpu_sample_ms = 0"
        );
        return None;
    }
    let gpus = gpus.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => record(gpus.read().await),
                _ = stop.cancelled() => break,
            }
        }
        // This worker no longer reports its GPUs.
        record(Vec::new());
    }))
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

/// The slots of this worker's concurrent runs. A run takes the lowest free
/// index (so at most `[worker] concurrency` indices are ever in use) and,
/// where the worker knows its GPUs, the GPU at that index among them:
/// slot N gets `devices[N % len]`, one GPU per run as `concurrency` means.
#[derive(Clone, Default)]
pub struct Slots {
    devices: Arc<Vec<u32>>,
    taken: Arc<Mutex<Vec<bool>>>,
}

impl Slots {
    /// `devices`: the GPUs runs may use, empty when unknown.
    pub fn new(devices: Vec<u32>) -> Self {
        Self {
            devices: Arc::new(devices),
            taken: Arc::default(),
        }
    }

    /// The GPUs for runs: the indices of `CUDA_VISIBLE_DEVICES` in the
    /// trainers' environment when it is set (none if they are UUIDs: the
    /// setting then stays as it is), else every device NVML counts.
    pub fn devices(trainer_env: Option<&str>, gpus: &Gpus) -> Vec<u32> {
        match trainer_env {
            Some(value) => visible_devices(Some(value)),
            None => (0..gpus.count()).collect(),
        }
    }

    /// A free slot, held until the lease is dropped.
    pub fn take(&self) -> SlotLease {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let index = match taken.iter().position(|t| !t) {
            Some(free) => free,
            None => {
                taken.push(false);
                taken.len() - 1
            }
        };
        taken[index] = true;
        let gpus = match self.devices.len() {
            0 => Vec::new(),
            n => vec![self.devices[index % n]],
        };
        SlotLease {
            slot: Slot {
                index: u16::try_from(index).unwrap_or(u16::MAX),
                gpus,
            },
            taken: self.taken.clone(),
        }
    }
}

/// A slot in use; dropping it frees the index.
pub struct SlotLease {
    slot: Slot,
    taken: Arc<Mutex<Vec<bool>>>,
}

impl SlotLease {
    pub fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taken.get_mut(usize::from(self.slot.index)) {
            *t = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_runs_get_distinct_slots_and_gpus_and_free_them() {
        let slots = Slots::new(vec![2, 5]);
        let a = slots.take();
        let b = slots.take();
        assert_eq!((a.slot().index, a.slot().gpus.as_slice()), (0, &[2][..]));
        assert_eq!((b.slot().index, b.slot().gpus.as_slice()), (1, &[5][..]));
        // More runs than GPUs share them in turn, each with its own index.
        let c = slots.take();
        assert_eq!((c.slot().index, c.slot().gpus.as_slice()), (2, &[2][..]));
        drop(a);
        let d = slots.take();
        assert_eq!((d.slot().index, d.slot().gpus.as_slice()), (0, &[2][..]));
        drop((b, c, d));
        assert_eq!(slots.take().slot().index, 0);
        // Without known GPUs a slot is just an index.
        let unknown = Slots::new(Vec::new());
        let (x, y) = (unknown.take(), unknown.take());
        assert_eq!((x.slot().index, y.slot().index), (0, 1));
        assert!(x.slot().gpus.is_empty() && y.slot().gpus.is_empty());
    }

    #[test]
    fn slot_gpus_come_from_the_trainer_environment_first() {
        assert_eq!(Slots::devices(Some("3,1"), &Gpus::default()), vec![3, 1]);
        assert!(Slots::devices(Some("GPU-1a2b"), &Gpus::default()).is_empty());
        assert!(Slots::devices(None, &Gpus::default()).is_empty());
    }

    #[test]
    fn visible_devices_are_parsed_or_all() {
        assert_eq!(visible_devices(Some("0, 2")), vec![0, 2]);
        assert!(visible_devices(Some("GPU-1a2b")).is_empty());
        assert!(visible_devices(None).is_empty());
    }

    #[test]
    fn a_reading_maps_to_the_gauges_fields() {
        let sample = gpu_sample(1, "NVIDIA A100".into(), 10 << 30, 80 << 30, 75);
        assert_eq!(
            sample,
            GpuSample {
                index: 1,
                name: "NVIDIA A100".into(),
                memory_used_bytes: 10 << 30,
                memory_total_bytes: 80 << 30,
                utilization: 0.75,
            }
        );
        assert_eq!(gpu_sample(0, String::new(), 0, 0, 250).utilization, 1.0);
    }

    /// A reading becomes the three GPU gauges, labelled by device; no
    /// reading (no NVML) leaves no GPU series at all.
    #[tokio::test]
    async fn readings_become_gauges_and_none_leave_no_series() {
        use trainyard_core::telemetry::{Telemetry, TelemetrySettings};
        let mut settings =
            TelemetrySettings::resolve("ty-worker", &Default::default(), &[]).unwrap();
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let (telemetry, _dispatch) = Telemetry::start(&settings).unwrap();
        let metrics = telemetry.metrics();
        metrics.set_gpus(Gpus::default().read().await);
        let body = telemetry.render_prometheus().unwrap();
        assert!(!body.contains("trainyard_gpu_"), "{body}");

        metrics.set_gpus([gpu_sample(1, "A100".into(), 10 << 30, 80 << 30, 75)]);
        let body = telemetry.render_prometheus().unwrap();
        let value = |name: &str| {
            body.lines()
                .find(|l| l.starts_with(name) && l.contains("gpu=\"1\""))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} in {body}"))
        };
        assert_eq!(value("trainyard_gpu_utilization_ratio"), 0.75);
        assert_eq!(
            value("trainyard_gpu_memory_used_bytes"),
            (10u64 << 30) as f64
        );
        assert_eq!(
            value("trainyard_gpu_memory_total_bytes"),
            (80u64 << 30) as f64
        );
        telemetry.shutdown().await;
    }

    #[tokio::test]
    async fn without_nvml_there_is_no_sampler() {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let sink = recorded.clone();
        let started = sampler(
            &Gpus::default(),
            Duration::from_millis(10),
            move |s| sink.lock().unwrap().push(s),
            CancellationToken::new(),
        );
        assert!(started.is_none());
        assert!(recorded.lock().unwrap().is_empty());
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
