//! hromada-train: LoRA and full fine-tuning on candle, with exact resume and exports that
//! PEFT and transformers load. `recipe::run` is the whole recipe, top to bottom.
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod optim;
pub mod params;
pub mod plot;
pub mod recipe;

pub use config::{Task, TrainConfig};
pub use error::{Error, Result};
