//! hromada's model core: architectures, weight loading (safetensors, GGUF, the Hub),
//! tokenizers, chat templates, sampling and the KV-cache interface. `train`, `serve` and
//! `eval` all stand on this crate.
pub mod bench;
pub mod cache;
pub mod chat;
pub mod config;
pub mod convert;
pub mod device;
pub mod error;
pub mod gemma3;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod shards;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use device::DeviceChoice;
pub use model::{DTypeChoice, LoadOptions, LoadedModel, Model};
