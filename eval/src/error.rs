use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A task file or a data line: file and line (0: the whole file).
    #[error("{path}:{line}: {msg}")]
    Task { path: PathBuf, line: usize, msg: String },
    #[error("endpoint {url}: {msg}")]
    Http { url: String, msg: String },
    #[error(transparent)]
    Model(#[from] hromada_models::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn task(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Task { path: path.into(), line, msg: msg.into() }
    }
}
