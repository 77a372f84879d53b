//! The DVC flow (N10): a dataset version written into a git + DVC repository, `dvc add`,
//! `dvc push` to the repository's default remote, and two commits:
//!
//! 1. `dataset <project> <spec summary> exported <time>`: the data file's `.dvc` file and the
//!    `.gitignore` DVC keeps beside it. This is the commit that pins code and data together.
//! 2. `dataset <project>: manifest of <commit 1>`: the manifest (`<file>.manifest.json`), whose
//!    `dvc.commit` names commit 1 (a commit cannot name its own hash).
//!
//! Anything failing (no `dvc`, a failing push, a failing commit) leaves the repository as it was:
//! HEAD back where it was, the index entries of the touched paths reset, the files restored (an
//! earlier version of the data file is moved aside first and moved back). Only objects in DVC's
//! cache (ignored by git) and on the remote (content-addressed) may stay behind. The touched
//! paths must have no uncommitted changes beforehand, so restoring them loses nothing.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::dataset::{self, DatasetError, DatasetSpec, DvcInfo, Manifest, Progress};
use crate::entity::project;

#[derive(Debug, thiserror::Error)]
pub enum DvcError {
    #[error(
        "{repo}: not a git + DVC repository ({missing} is missing; run `git init` and `dvc init` there)"
    )]
    NotARepository { repo: String, missing: &'static str },
    #[error("cannot run {program:?} ({error}); install it or set annotation.dvc_bin")]
    Missing { program: String, error: String },
    #[error("`{command}` failed in {repo}: {output}")]
    Failed {
        command: String,
        repo: String,
        output: String,
    },
    #[error("{repo}: {path} has uncommitted changes; commit or discard them first")]
    Dirty { repo: String, path: String },
    #[error("{0}")]
    Path(String),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What an export into a repository produced.
#[derive(Debug, Clone)]
pub struct Published {
    pub manifest: Manifest,
    /// Commit 1 (the `.dvc` file).
    pub data_commit: String,
    /// Commit 2 (the manifest).
    pub manifest_commit: String,
    /// The data file, absolute.
    pub data_path: PathBuf,
}

struct Repo<'a> {
    root: &'a Path,
    dvc: &'a str,
}

impl Repo<'_> {
    async fn run(&self, program: &str, args: &[&str]) -> Result<String, DvcError> {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.root)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| DvcError::Missing {
                program: program.to_owned(),
                error: e.to_string(),
            })?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            let mut output = format!("{}\n{}", text(&out.stderr), text(&out.stdout));
            output = output.trim().to_owned();
            if output.len() > 2000 {
                output = format!("...{}", &output[output.len() - 2000..]);
            }
            Err(DvcError::Failed {
                command: format!("{program} {}", args.join(" ")),
                repo: self.root.display().to_string(),
                output,
            })
        }
    }

    async fn git(&self, args: &[&str]) -> Result<String, DvcError> {
        self.run("git", args).await
    }

    async fn dvc(&self, args: &[&str]) -> Result<String, DvcError> {
        self.run(self.dvc, args).await
    }

    async fn head(&self) -> Result<Option<String>, DvcError> {
        match self.git(&["rev-parse", "--verify", "-q", "HEAD"]).await {
            Ok(h) => Ok(Some(h)),
            Err(DvcError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A file's content before the export touched it (`None`: it did not exist).
struct Saved {
    path: PathBuf,
    before: Option<Vec<u8>>,
}

async fn save(path: PathBuf) -> Result<Saved, DvcError> {
    let before = match tokio::fs::read(&path).await {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Saved { path, before })
}

fn rel_str(p: &Path) -> Result<String, DvcError> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DvcError::Path(format!("{} is not UTF-8", p.display())))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The md5 of the first `outs` entry of a `.dvc` file.
fn dvc_md5(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .map(|l| l.trim_start_matches("- "))
        .find_map(|l| l.strip_prefix("md5:"))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_owned())
}

/// The default place of a project's dataset inside a repository.
pub fn default_path(p: &project::Model, format: dataset::Format) -> PathBuf {
    let name = dataset::safe_name(&p.name);
    PathBuf::from("datasets")
        .join(&name)
        .join(format!("{name}.{}", format.ext()))
}

/// Export `spec` into the repository at `root` at `rel` (relative to it) and commit it.
pub async fn publish<C: sea_orm::ConnectionTrait, P: Progress>(
    db: &C,
    project: &project::Model,
    spec: &DatasetSpec,
    root: &Path,
    rel: &Path,
    dvc_bin: &str,
    progress: &mut P,
) -> Result<Published, DvcError> {
    let repo_name = root.display().to_string();
    for (dir, missing) in [(".git", ".git"), (".dvc", ".dvc")] {
        if !root.join(dir).exists() {
            return Err(DvcError::NotARepository {
                repo: repo_name,
                missing,
            });
        }
    }
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(DvcError::Path(format!(
            "{}: the path inside the repository must be relative, without `..`",
            rel.display()
        )));
    }
    let repo = Repo { root, dvc: dvc_bin };
    // Both tools answer before anything is touched.
    repo.git(&["--version"]).await?;
    repo.dvc(&["--version"]).await?;

    let data = root.join(rel);
    let dvc_file_rel = with_suffix(rel, ".dvc");
    let manifest_rel = with_suffix(rel, ".manifest.json");
    let dir_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let gitignore_rel = dir_rel.join(".gitignore");
    let tracked = [&dvc_file_rel, &gitignore_rel, &manifest_rel];
    let tracked_str: Vec<String> = tracked
        .iter()
        .map(|p| rel_str(p))
        .collect::<Result<_, _>>()?;
    let rel_s = rel_str(rel)?;

    let mut status_args = vec!["status", "--porcelain", "--"];
    status_args.extend(tracked_str.iter().map(String::as_str));
    let status = repo.git(&status_args).await?;
    if let Some(line) = status.lines().next() {
        return Err(DvcError::Dirty {
            repo: repo_name,
            path: line.get(3..).unwrap_or(line).to_owned(),
        });
    }

    let head = repo.head().await?;
    let mut saved = Vec::new();
    for p in &tracked {
        saved.push(save(root.join(p)).await?);
    }
    // Directories the export creates, outermost first, to remove on failure.
    let mut created = Vec::new();
    let mut d = root.join(&dir_rel);
    while !d.exists() && d != root {
        created.push(d.clone());
        match d.parent() {
            Some(p) => d = p.to_path_buf(),
            None => break,
        }
    }
    created.reverse();
    let backup = with_suffix(&data, ".bulwark-previous");
    let had_data = tokio::fs::try_exists(&data).await.unwrap_or(false);
    if had_data {
        tokio::fs::rename(&data, &backup).await?;
    }

    let result = async {
        let generated = dataset::write_file(db, project, spec, &data, None, progress).await?;
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut manifest = Manifest::new(spec.clone(), project, file_name, &generated);
        repo.dvc(&["add", "--quiet", &rel_s]).await?;
        let dvc_file_s = rel_str(&dvc_file_rel)?;
        repo.dvc(&["push", "--quiet", &dvc_file_s]).await?;
        let gitignore_s = rel_str(&gitignore_rel)?;
        let mut add = vec!["add", "--", dvc_file_s.as_str()];
        if root.join(&gitignore_rel).exists() {
            add.push(&gitignore_s);
        }
        repo.git(&add).await?;
        let when = manifest
            .generated_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let message = format!(
            "dataset {} {} exported {when}",
            project.name,
            spec.summary()
        );
        // `--allow-empty`: the same data again still records that it was exported.
        let mut commit = vec![
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            message.as_str(),
            "--",
        ];
        commit.extend(add[2..].iter().copied());
        repo.git(&commit).await?;
        let data_commit = repo.git(&["rev-parse", "HEAD"]).await?;
        let md5 = tokio::fs::read_to_string(root.join(&dvc_file_rel))
            .await
            .ok()
            .and_then(|t| dvc_md5(&t));
        manifest.dvc = Some(DvcInfo {
            commit: data_commit.clone(),
            path: rel_s.clone(),
            md5,
        });
        let text = serde_json::to_vec_pretty(&manifest).map_err(DatasetError::from)?;
        tokio::fs::write(root.join(&manifest_rel), text).await?;
        let manifest_s = rel_str(&manifest_rel)?;
        repo.git(&["add", "--", &manifest_s]).await?;
        let short: String = data_commit.chars().take(12).collect();
        let message = format!("dataset {}: manifest of {short}", project.name);
        repo.git(&["commit", "-q", "-m", &message, "--", &manifest_s])
            .await?;
        let manifest_commit = repo.git(&["rev-parse", "HEAD"]).await?;
        Ok::<_, DvcError>(Published {
            manifest,
            data_commit,
            manifest_commit,
            data_path: data.clone(),
        })
    }
    .await;

    match result {
        Ok(p) => {
            if had_data {
                let _ = tokio::fs::remove_file(&backup).await;
            }
            Ok(p)
        }
        Err(e) => {
            if let Err(r) = restore(
                &repo,
                head.as_deref(),
                &tracked_str,
                &saved,
                &data,
                had_data.then_some(&backup),
                &created,
            )
            .await
            {
                tracing::warn!(message = "Restoring the repository failed.", error = %r);
                return Err(DvcError::Path(format!(
                    "{e}; and restoring {repo_name} failed too: {r}"
                )));
            }
            Err(e)
        }
    }
}

/// Put the repository back: HEAD, the index entries of `paths`, the files.
async fn restore(
    repo: &Repo<'_>,
    head: Option<&str>,
    paths: &[String],
    saved: &[Saved],
    data: &Path,
    backup: Option<&PathBuf>,
    created: &[PathBuf],
) -> Result<(), DvcError> {
    let now = repo.head().await?;
    match head {
        Some(h) => {
            if now.as_deref() != Some(h) {
                repo.git(&["reset", "-q", "--soft", h]).await?;
            }
            let mut args = vec!["reset", "-q", "--"];
            args.extend(paths.iter().map(String::as_str));
            // Fails only when none of the paths is known to git: nothing to reset then.
            let _ = repo.git(&args).await;
        }
        None => {
            if now.is_some() {
                repo.git(&["update-ref", "-d", "HEAD"]).await?;
            }
            let mut args = vec!["rm", "-q", "--cached", "--ignore-unmatch", "--"];
            args.extend(paths.iter().map(String::as_str));
            repo.git(&args).await?;
        }
    }
    for s in saved {
        match &s.before {
            Some(b) => tokio::fs::write(&s.path, b).await?,
            None => match tokio::fs::remove_file(&s.path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
    }
    match tokio::fs::remove_file(data).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    if let Some(b) = backup {
        tokio::fs::rename(b, data).await?;
    }
    for d in created.iter().rev() {
        let _ = tokio::fs::remove_dir(d).await;
    }
    Ok(())
}
