//! A per-test scratch directory that is removed when the test ends, shared by every
//! crate's integration tests (`#[path]`-included). Tests write model exports and
//! checkpoints of hundreds of MB; left behind, they filled a small CI disk.
//! `HROMADA_KEEP_TEST_DIRS=1` keeps them for a post-mortem.
#![allow(dead_code)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

pub struct TmpDir(PathBuf);

/// A fresh, empty `$TMPDIR/hromada-<name>-<pid>`.
pub fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("hromada-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("create temp dir {}: {e}", d.display());
    }
    TmpDir(d)
}

impl Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TmpDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var_os("HROMADA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
