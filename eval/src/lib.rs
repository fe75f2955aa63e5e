//! hromada-eval: an evaluation harness with Ukrainian tasks. Tasks are YAML files
//! (`tasks/`), scored by log-likelihood (multiple choice), rolling log-likelihood
//! (perplexity) or generation, against the model in process or any OpenAI-compatible
//! endpoint; results are written as lm-evaluation-harness writes them.
pub mod backend;
pub mod error;
pub mod metrics;
pub mod run;
pub mod task;

pub use error::{Error, Result};
