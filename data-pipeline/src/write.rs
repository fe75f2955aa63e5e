//! Writers: JSONL (plain, .gz, .zst) and Parquet (`id`, `text`, `metadata` as a JSON
//! string). Every writer writes `NAME.tmp` and renames it to `NAME` in `finish`, so a file
//! with its final name is always complete; a killed run leaves only `.tmp` files, which
//! the next run overwrites. Output is deterministic (no timestamps, single-threaded
//! compression), so a re-run produces the same bytes.

use crate::config::OutputFormat;
use crate::error::{Error, Result};
use crate::Document;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Write `bytes` to `path` atomically (tmp + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

enum Sink {
    Plain(BufWriter<File>),
    Gz(flate2::write::GzEncoder<BufWriter<File>>),
    Zst(zstd::stream::write::Encoder<'static, BufWriter<File>>),
    Parquet {
        writer: parquet::arrow::ArrowWriter<File>,
        rows: Vec<(String, String, String)>,
    },
}

pub struct DocWriter {
    path: PathBuf,
    tmp: PathBuf,
    sink: Sink,
    pub docs: u64,
    line: Vec<u8>,
}

const PARQUET_BATCH: usize = 1024;

fn parquet_schema() -> Arc<arrow_schema::Schema> {
    use arrow_schema::{DataType, Field, Schema};
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, false),
    ]))
}

impl DocWriter {
    /// `path` without extension; the format's extension is added.
    pub fn create(stem: &Path, format: OutputFormat) -> Result<Self> {
        let mut name = stem.as_os_str().to_owned();
        name.push(".");
        name.push(format.extension());
        let path = PathBuf::from(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = tmp_path(&path);
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let sink = match format {
            OutputFormat::Jsonl | OutputFormat::None => Sink::Plain(BufWriter::with_capacity(1 << 20, f)),
            OutputFormat::JsonlGz => Sink::Gz(flate2::write::GzEncoder::new(
                BufWriter::with_capacity(1 << 20, f),
                flate2::Compression::new(6),
            )),
            OutputFormat::JsonlZst => Sink::Zst(
                zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, f), 3)
                    .map_err(|e| Error::io(&tmp, e))?,
            ),
            OutputFormat::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                    .set_created_by("hromada".into())
                    .build();
                let writer = parquet::arrow::ArrowWriter::try_new(f, parquet_schema(), Some(props))
                    .map_err(|e| Error::Parquet { path: tmp.clone(), msg: e.to_string() })?;
                Sink::Parquet { writer, rows: Vec::new() }
            }
        };
        Ok(Self { path, tmp, sink, docs: 0, line: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, doc: &Document) -> Result<()> {
        self.docs += 1;
        let tmp = self.tmp.clone();
        let ioerr = |e: std::io::Error| Error::io(&tmp, e);
        if let Sink::Parquet { writer, rows } = &mut self.sink {
            rows.push((doc.id.clone(), doc.text.clone(), serde_json::Value::Object(doc.metadata.clone()).to_string()));
            if rows.len() >= PARQUET_BATCH {
                flush_parquet(writer, rows, &self.tmp)?;
            }
            return Ok(());
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, doc).map_err(|e| Error::Other(e.to_string()))?;
        self.line.push(b'\n');
        match &mut self.sink {
            Sink::Plain(w) => w.write_all(&self.line).map_err(ioerr),
            Sink::Gz(w) => w.write_all(&self.line).map_err(ioerr),
            Sink::Zst(w) => w.write_all(&self.line).map_err(ioerr),
            Sink::Parquet { .. } => Ok(()),
        }
    }

    /// Flush, fsync and rename into place.
    pub fn finish(self) -> Result<PathBuf> {
        let tmp = self.tmp.clone();
        let ioerr = |e: std::io::Error| Error::io(&tmp, e);
        let file = match self.sink {
            Sink::Plain(w) => w.into_inner().map_err(|e| ioerr(e.into_error()))?,
            Sink::Gz(w) => w.finish().map_err(ioerr)?.into_inner().map_err(|e| ioerr(e.into_error()))?,
            Sink::Zst(w) => w.finish().map_err(ioerr)?.into_inner().map_err(|e| ioerr(e.into_error()))?,
            Sink::Parquet { mut writer, mut rows } => {
                flush_parquet(&mut writer, &mut rows, &tmp)?;
                writer.into_inner().map_err(|e| Error::Parquet { path: tmp.clone(), msg: e.to_string() })?
            }
        };
        file.sync_all().map_err(ioerr)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.path)
    }
}

fn flush_parquet(w: &mut parquet::arrow::ArrowWriter<File>, rows: &mut Vec<(String, String, String)>, path: &Path) -> Result<()> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&(String, String, String)) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let batch = RecordBatch::try_new(parquet_schema(), vec![col(|r| &r.0), col(|r| &r.1), col(|r| &r.2)])
        .map_err(|e| Error::Parquet { path: path.to_path_buf(), msg: e.to_string() })?;
    w.write(&batch).map_err(|e| Error::Parquet { path: path.to_path_buf(), msg: e.to_string() })?;
    rows.clear();
    Ok(())
}
