//! `hromada data slurm`: write sbatch scripts that run a pipeline's slices as Slurm job
//! arrays, one stage after another (`--dependency=afterok`), and a `submit.sh` that
//! submits them in order. Without dedup there is one array and a report job; with dedup
//! the stages are signatures (array over slices), buckets (array over bands), clusters
//! (one job), filter (array over slices) and report.

use crate::config::PipelineConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct SlurmOptions {
    pub tasks: usize,
    /// The hromada binary on the cluster.
    pub binary: String,
    pub partition: Option<String>,
    pub cpus_per_task: usize,
    pub mem: String,
    pub time: String,
    /// Extra `#SBATCH` lines (without the prefix).
    pub extra: Vec<String>,
}

fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Write the scripts into `dir`; returns the paths (stage scripts, then submit.sh).
pub fn write_scripts(pipeline: &Path, cfg: &PipelineConfig, opts: &SlurmOptions, dir: &Path) -> Result<Vec<PathBuf>> {
    if opts.tasks == 0 {
        return Err(Error::Other("--tasks must be at least 1".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pipeline = std::fs::canonicalize(pipeline).map_err(|e| Error::io(pipeline, e))?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let n = opts.tasks;
    let mut stages: Vec<(&str, Option<usize>)> = Vec::new();
    match cfg.steps.iter().find_map(|s| match s {
        crate::config::StepConfig::Dedup(d) => Some(d.bands),
        _ => None,
    }) {
        None => {
            stages.push(("filter", Some(n)));
        }
        Some(bands) => {
            stages.push(("signatures", Some(n)));
            stages.push(("buckets", Some((bands + 1).min(n.max(1)))));
            stages.push(("clusters", None));
            stages.push(("filter", Some(n)));
        }
    }
    stages.push(("report", None));
    let mut paths = Vec::new();
    for (i, (stage, array)) in stages.iter().enumerate() {
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!("#SBATCH --job-name=hromada-data-{stage}\n"));
        s.push_str(&format!("#SBATCH --cpus-per-task={}\n#SBATCH --mem={}\n#SBATCH --time={}\n", opts.cpus_per_task, opts.mem, opts.time));
        if let Some(p) = &opts.partition {
            s.push_str(&format!("#SBATCH --partition={p}\n"));
        }
        for e in &opts.extra {
            s.push_str(&format!("#SBATCH {e}\n"));
        }
        let log = logs.join(format!("{i}-{stage}-%A_%a.log"));
        s.push_str(&format!("#SBATCH --output={}\n", log.display()));
        if let Some(a) = array {
            s.push_str(&format!("#SBATCH --array=0-{}\n", a - 1));
        }
        s.push_str("set -euo pipefail\nexport RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n");
        let shard = match array {
            Some(a) => format!(" --shard \"${{SLURM_ARRAY_TASK_ID}}/{a}\""),
            None => String::new(),
        };
        s.push_str(&format!(
            "exec {} data run {} --stage {stage}{shard} --no-progress\n",
            q(&opts.binary),
            q(&pipeline.to_string_lossy())
        ));
        let path = dir.join(format!("{i}-{stage}.sbatch"));
        std::fs::write(&path, s).map_err(|e| Error::io(&path, e))?;
        paths.push(path);
    }
    let mut sub = String::from("#!/bin/bash\n# Submit the stages in order, each after the previous one succeeded.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\ndep=\"\"\n");
    for p in &paths {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        sub.push_str(&format!(
            "id=$(sbatch --parsable ${{dep:+--dependency=afterok:$dep}} {})\necho \"{name}: $id\"\ndep=\"${{id%%;*}}\"\n",
            q(&name)
        ));
    }
    let sp = dir.join("submit.sh");
    std::fs::write(&sp, sub).map_err(|e| Error::io(&sp, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in paths.iter().chain(std::iter::once(&sp)) {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
        }
    }
    paths.push(sp);
    Ok(paths)
}
