//! hromada's inference server: an OpenAI-compatible HTTP API ([`server`]) over an engine. As in vLLM, three parts with one job each:
//! - [`block_manager`]: the paged KV cache's bookkeeping (block tables, reference counts,
//!   prefix caching by chained block hashes); it never sees a tensor;
//! - [`scheduler`]: waiting and running queues, token budget, chunked prefill,
//!   preemption by recompute; it never sees a tensor either;
//! - [`paged`]: the K/V storage and the batched, variable-length attention over block
//!   tables, behind `hromada_models::cache::KvCache`, so one model call advances every
//!   scheduled sequence.
pub mod api;
pub mod bench;
pub mod bench_attention;
pub mod block_manager;
pub mod engine;
pub mod paged;
#[cfg(feature = "cuda")]
pub mod paged_cuda;
pub mod metrics;
pub mod openapi;
pub mod scheduler;
pub mod server;
