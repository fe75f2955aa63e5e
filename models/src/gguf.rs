//! GGUF (v2/v3) reading: metadata, tensor bounds validation and tensor access.
//!
//! The header is parsed by candle's `gguf_file`; tensor data is memory-mapped and every
//! tensor's byte range is checked against the file size up front, so a truncated file
//! fails at open time with the name of the first tensor that does not fit.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).finish()
    }
}

fn tensor_nbytes(dtype: GgmlDType, elems: usize) -> Option<usize> {
    let bs = dtype.block_size();
    if bs == 0 || elems % bs != 0 {
        return None;
    }
    (elems / bs).checked_mul(dtype.type_size())
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(&path, e))?
            .len();
        let content = Content::read(&mut file).map_err(|e| Error::Gguf {
            path: path.clone(),
            msg: format!("cannot read the header ({e}); the file is truncated or corrupt"),
        })?;
        // Check every tensor's byte range before anything is read.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, i)| i.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let nbytes = tensor_nbytes(info.ggml_dtype, elems).ok_or_else(|| Error::Gguf {
                path: path.clone(),
                msg: format!(
                    "tensor `{name}` has {elems} elements, not a multiple of the {:?} block size",
                    info.ggml_dtype
                ),
            })?;
            let start = content.tensor_data_offset.checked_add(info.offset);
            let end = start.and_then(|s| s.checked_add(nbytes as u64));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::Gguf {
                        path: path.clone(),
                        msg: format!(
                            "truncated: tensor `{name}` needs bytes up to {} but the file has {file_len} bytes",
                            end.map(|e| e.to_string()).unwrap_or_else(|| "overflow".into())
                        ),
                    })
                }
            }
        }
        // SAFETY: the map is read-only; the file is not expected to change while a model
        // is loaded (the same contract as llama.cpp's and candle's mmap loaders).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            content,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn version(&self) -> u32 {
        use candle_core::quantized::gguf_file::VersionedMagic as V;
        match self.content.magic {
            V::GgufV1 => 1,
            V::GgufV2 => 2,
            V::GgufV3 => 3,
        }
    }

    fn meta_err(&self, key: &str, msg: &str) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            msg: format!("metadata `{key}`: {msg}"),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.meta_err(key, "expected a string")),
            None => Err(self.meta_err(key, "missing")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Option<String> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(self.meta_err(key, "expected a non-negative integer")),
        };
        Ok(Some(n))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|v| v as usize)
            .ok_or_else(|| self.meta_err(key, "missing"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.opt_u64(key)?.map(|v| v as usize))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.opt_u64(key).map(|v| v.map(|x| x as f64)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn str_array(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            Some(Value::Array(vs)) => vs
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.meta_err(key, "expected an array of strings")),
                })
                .collect(),
            Some(_) => Err(self.meta_err(key, "expected an array")),
            None => Err(self.meta_err(key, "missing")),
        }
    }

    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            Some(Value::Array(vs)) => vs
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    _ => Err(self.meta_err(key, "expected an array of floats")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.meta_err(key, "expected an array")),
            None => Ok(None),
        }
    }

    pub fn i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        match self.get(key) {
            Some(Value::Array(vs)) => vs
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x),
                    Value::U32(x) => Ok(*x as i32),
                    Value::I8(x) => Ok(*x as i32),
                    Value::U8(x) => Ok(*x as i32),
                    _ => Err(self.meta_err(key, "expected an array of integers")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.meta_err(key, "expected an array")),
            None => Ok(None),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    /// Shape in candle's order (outermost first), dtype.
    pub fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    fn raw(&self, name: &str) -> Result<(&[u8], Vec<usize>, GgmlDType)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let elems = info.shape.elem_count();
        // Bounds were validated in `open`.
        let nbytes = tensor_nbytes(info.ggml_dtype, elems).unwrap_or(0);
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let bytes = self.mmap.get(start..start + nbytes).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            msg: format!("tensor `{name}` lies outside the file"),
        })?;
        Ok((bytes, info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// A tensor as stored (quantized or not), on `device`.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let (bytes, dims, dtype) = self.raw(name)?;
        let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
        Ok(QTensor::new(storage, dims)?)
    }

    /// A 2-D tensor whose rows were permuted by llama.cpp's converter for interleaved
    /// RoPE (`llama` architecture Q and K projections), returned in the Hugging Face row
    /// order. Rows are quantized independently, so rows are moved as whole byte runs and
    /// no precision is lost.
    pub fn qtensor_unpermute_rows(
        &self,
        name: &str,
        n_head: usize,
        device: &Device,
    ) -> Result<QTensor> {
        let (bytes, dims, dtype) = self.raw(name)?;
        let rows = *dims.first().unwrap_or(&0);
        let bad = |msg: String| Error::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            msg,
        };
        if dims.is_empty() || n_head == 0 || rows % (2 * n_head) != 0 {
            return Err(bad(format!(
                "shape {dims:?} cannot be split into {n_head} rotary heads"
            )));
        }
        let row_bytes = bytes.len() / rows;
        let head_dim = rows / n_head;
        let half = head_dim / 2;
        let mut out = vec![0u8; bytes.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    let dst = h * head_dim + j * half + i;
                    let src = h * head_dim + 2 * i + j;
                    out[dst * row_bytes..(dst + 1) * row_bytes]
                        .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        let storage = QStorage::from_data(Cow::Owned(out), device, dtype)?;
        Ok(QTensor::new(storage, dims)?)
    }
}
