//! `--device auto|cpu|cuda[:N]`: where a model runs. `auto` takes the first GPU when the
//! binary was built with the `cuda` feature and a GPU answers, else the CPU, and logs
//! which; asking for `cuda` in a CPU-only build is a clear error, not a silent fallback.
use crate::error::{Error, Result};
use candle_core::Device;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(Error::InvalidArgument(format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"))),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// True when this binary has the CUDA backend compiled in.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// The candle device. `auto` never fails: no CUDA build or no GPU gives the CPU.
    pub fn device(self) -> Result<Device> {
        let dev = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(n) => {
                if !CUDA_BUILT {
                    return Err(Error::InvalidArgument(format!(
                        "device cuda:{n}: this binary was built without CUDA (rebuild with `--features cuda`, see scripts/cuda-toolchain.sh)"
                    )));
                }
                cuda(n).map_err(|e| Error::InvalidArgument(format!("device cuda:{n}: {e}")))?
            }
            Self::Auto => {
                if CUDA_BUILT {
                    match cuda(0) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::info!(reason = %e, "no usable GPU: running on the CPU");
                            Device::Cpu
                        }
                    }
                } else {
                    Device::Cpu
                }
            }
        };
        tracing::info!(device = %describe(&dev), asked = %self, "device");
        Ok(dev)
    }
}

/// GPU `n` with one CUDA stream that every thread of the process issues its work to.
///
/// candle's `Device::new_cuda` gives each host thread its own stream (CUDA's per-thread
/// default stream), and nothing orders one thread's stream after another's. hromada
/// issues a forward pass from the compute pool's threads and uploads its inputs and reads
/// its outputs from the caller's: on per-thread streams a kernel could read ids not yet
/// copied, a copy could read logits not yet written, and memory freed on one stream could
/// be reused on another while still read (seen on an H200: wrong logits, a device-side
/// assert in an index_select, an illegal address in the server). One stream per GPU,
/// shared by every load in the process, keeps all of it in issue order.
///
/// Creating an explicit stream puts cudarc in multi-stream mode, where every kernel
/// records a CUDA event for each buffer it reads or writes so that other streams can wait
/// on them. No other stream exists here (nothing in hromada makes one), so those events
/// order nothing and cost host time on every launch. `HROMADA_CUDA_EVENT_TRACKING=0` turns
/// them off; it stays opt-in until a GPU run has passed the GPU tests with it and measured
/// it (`GPU_CHECK_ONLY="tests events" scripts/gpu-check.sh` runs both settings).
pub fn cuda(n: usize) -> candle_core::Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut devices = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&n) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda_with_stream(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        if std::env::var("HROMADA_CUDA_EVENT_TRACKING").as_deref() == Ok("0") {
            // SAFETY: every tensor of this process lives on this device's one stream (the
            // device is cached here and handed out to every load), so no buffer is used
            // on a second stream and no cross-stream ordering is needed; the tracking
            // flag only affects buffers allocated after this call, all of them on that
            // stream.
            unsafe { c.disable_event_tracking() };
        }
    }
    devices.insert(n, d.clone());
    Ok(d)
}

/// `cpu` or `cuda:N`.
pub fn describe(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        let e = "cuda:x".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(e.contains("cuda:x") && e.contains("cuda:N"), "{e}");
        assert!("tpu".parse::<DeviceChoice>().is_err());
        // auto always yields a device; on a CPU-only build it is the CPU.
        let d = DeviceChoice::Auto.device().unwrap();
        if !CUDA_BUILT {
            assert!(d.is_cpu());
            let e = DeviceChoice::Cuda(0).device().unwrap_err().to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
        assert!(DeviceChoice::Cpu.device().unwrap().is_cpu());
    }
}
