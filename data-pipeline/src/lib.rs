//! hromada-data: the data pipeline. A pipeline is a list of small steps over a stream of
//! documents `{id, text, metadata}`; every step counts what it kept, dropped (and why) and
//! modified. Readers and writers stream, the executor runs input files in parallel with
//! rayon, and every output file is written to a temporary name and renamed when done, so
//! a killed run resumes where it stopped and produces byte-identical output.
//!
//! Stages (see `exec`): `signatures` runs the per-document steps up to `dedup` and writes
//! MinHash signatures; `buckets` and `clusters` find duplicate clusters across all input
//! slices; `filter` drops duplicates and runs the steps after `dedup` (e.g. `tokenize`).
//! Without a `dedup` step there is one stage.

pub mod bench;
pub mod config;
pub mod dedup;
pub mod error;
pub mod exec;
pub mod read;
pub mod report;
pub mod shards;
pub mod slurm;
pub mod stats;
pub mod steps;
pub mod write;

pub use config::PipelineConfig;
pub use error::{Error, Result};
pub use stats::{RunStats, StepStats};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One document flowing through the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

impl Document {
    pub fn new(id: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            text: text.into(),
            metadata: Map::new(),
        }
    }
}
