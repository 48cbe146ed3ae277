//! `yard captions` and `yard approve`: a job's captions in review.
//!
//! `--export DIR` writes one `<name>.txt` per dataset file (its path with
//! the extension `.txt`) and `yard-captions.json`: the job, the version the
//! captions were read at, and each exported caption. `--apply DIR` sends the
//! captions whose text differs from what was exported (compared as one
//! trimmed line, as the coordinator stores them), made on that version: if
//! someone changed the job's captions meanwhile the coordinator refuses
//! (ABORTED) and nothing is changed; export again. After an apply the
//! version file holds the new version, so edits can go on from the folder.

use crate::args::{ApproveArgs, CaptionsArgs};
use crate::client::Client;
use crate::view::{self, state_name};
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use trainyard_proto::v1::{
    ApproveCaptionsRequest, CaptionEntry, Captions, GetCaptionsRequest, JobState,
    UpdateCaptionsRequest,
};

/// The file beside the exported captions that says what they were.
pub const VERSION_FILE: &str = "yard-captions.json";

/// One exported caption: the dataset file it belongs to and its text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub path: String,
    pub caption: String,
}

/// `yard-captions.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VersionFile {
    pub job_id: String,
    pub version: u32,
    /// Text file (relative to the folder) → what it held when exported.
    pub files: BTreeMap<String, Exported>,
}

/// The text file of a dataset file: its path with the extension `.txt`;
/// refused when the path could leave the folder.
pub fn text_file(path: &str) -> anyhow::Result<String> {
    let relative = Path::new(path);
    let plain = !path.is_empty()
        && !path.contains('\\')
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("the coordinator named an unsafe dataset path {path:?}");
    }
    Ok(relative
        .with_extension("txt")
        .to_string_lossy()
        .into_owned())
}

/// The version file and the text files (name, caption) of `captions`.
pub fn export_plan(captions: &Captions) -> anyhow::Result<(VersionFile, Vec<(String, String)>)> {
    let mut files = BTreeMap::new();
    let mut texts = Vec::new();
    for entry in &captions.entries {
        let name = text_file(&entry.path)?;
        let exported = Exported {
            path: entry.path.clone(),
            caption: entry.caption.clone(),
        };
        if files.insert(name.clone(), exported).is_some() {
            bail!("two dataset files share the caption file {name}");
        }
        texts.push((name, format!("{}\n", entry.caption)));
    }
    let version = VersionFile {
        job_id: captions.job_id.clone(),
        version: captions.version,
        files,
    };
    Ok((version, texts))
}

/// A caption as the coordinator keeps it: one trimmed line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The edits of an exported folder: each text file whose caption differs
/// from the exported one (`read` answers a file's text, `None` when gone).
pub fn edits(
    version: &VersionFile,
    mut read: impl FnMut(&str) -> Option<String>,
) -> Vec<CaptionEntry> {
    version
        .files
        .iter()
        .filter_map(|(name, exported)| {
            let text = one_line(&read(name)?);
            (text != one_line(&exported.caption)).then(|| CaptionEntry {
                path: exported.path.clone(),
                caption: text,
                ..Default::default()
            })
        })
        .collect()
}

pub async fn run(client: &mut Client, args: CaptionsArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &args.apply {
        return apply(client, &args.job, dir).await;
    }
    let captions = client
        .get_captions(GetCaptionsRequest {
            job_id: args.job.clone(),
        })
        .await?
        .into_inner();
    if let Some(dir) = &args.export {
        export(&captions, dir)?;
        println!(
            "{} captions of {} (version {}) written to {}; edit them, then `yard captions {} --apply {}`",
            captions.entries.len(),
            captions.job_id,
            captions.version,
            dir.display(),
            captions.job_id,
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        println!(
            "{}",
            view::proto_json("trainyard.v1.Captions", &captions, true)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", captions_text(&captions));
    Ok(ExitCode::SUCCESS)
}

/// `yard captions <job>`: a header, then one line per file.
pub fn captions_text(captions: &Captions) -> String {
    let width = captions
        .entries
        .iter()
        .map(|e| e.path.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "job {}  captions version {}  ({} files)\n",
        captions.job_id,
        captions.version,
        captions.entries.len()
    );
    for e in &captions.entries {
        out.push_str(&format!(
            "{:<width$}  {}  ({})\n",
            e.path, e.caption, e.source
        ));
    }
    out
}

fn write_version(dir: &Path, version: &VersionFile) -> anyhow::Result<()> {
    let path = dir.join(VERSION_FILE);
    let json = serde_json::to_string_pretty(version)?;
    std::fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn export(captions: &Captions, dir: &Path) -> anyhow::Result<()> {
    let (version, texts) = export_plan(captions)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in texts {
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    write_version(dir, &version)
}

async fn apply(client: &mut Client, job: &str, dir: &Path) -> anyhow::Result<ExitCode> {
    let path = dir.join(VERSION_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (made by `yard captions {job} --export {}`)",
            path.display(),
            dir.display()
        )
    })?;
    let version: VersionFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a captions version file", path.display()))?;
    if version.job_id != job {
        bail!(
            "{} holds the captions of job {}, not {job}",
            dir.display(),
            version.job_id
        );
    }
    let changed = edits(&version, |name| {
        let file: PathBuf = dir.join(name);
        match std::fs::read_to_string(&file) {
            Ok(text) => Some(text),
            Err(error) => {
                eprintln!("skipped {}: {error}", file.display());
                None
            }
        }
    });
    if changed.is_empty() {
        println!(
            "no caption changed in {} (version {})",
            dir.display(),
            version.version
        );
        return Ok(ExitCode::SUCCESS);
    }
    let count = changed.len();
    let captions = client
        .update_captions(UpdateCaptionsRequest {
            job_id: job.to_string(),
            version: version.version,
            entries: changed,
        })
        .await?
        .into_inner();
    // The folder now stands for the new version.
    let (updated, _) = export_plan(&captions)?;
    write_version(dir, &updated)?;
    println!(
        "{count} captions changed: {} now at version {}; `yard approve {}` to train",
        captions.job_id, captions.version, captions.job_id
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn approve(client: &mut Client, args: ApproveArgs) -> anyhow::Result<ExitCode> {
    let record = client
        .approve_captions(ApproveCaptionsRequest {
            job_id: args.job.clone(),
            version: args.version.unwrap_or(0),
        })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a job"))?;
    match record.state() {
        JobState::Training if record.quota_hold.is_empty() => println!(
            "{} approved (captions version {}): TRAINING",
            record.job_id, record.captions_version
        ),
        JobState::Training => println!(
            "{} approved (captions version {}): held, {}",
            record.job_id, record.captions_version, record.quota_hold
        ),
        state => println!(
            "{} was approved already; it is {}",
            record.job_id,
            state_name(state)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captions() -> Captions {
        let entry = |path: &str, caption: &str| CaptionEntry {
            path: path.into(),
            caption: caption.into(),
            source: "template".into(),
            media: "image".into(),
        };
        Captions {
            job_id: "j-1".into(),
            version: 3,
            entries: vec![entry("a.png", "ohwx a"), entry("clip.mp4", "ohwx b")],
        }
    }

    #[test]
    fn an_export_edited_and_applied_sends_only_the_changes() {
        let (version, texts) = export_plan(&captions()).unwrap();
        assert_eq!(version.version, 3);
        let names: Vec<_> = texts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.txt", "clip.txt"]);
        let mut files: BTreeMap<String, String> = texts.into_iter().collect();
        assert!(edits(&version, |n| files.get(n).cloned()).is_empty());
        files.insert("clip.txt".into(), "  ohwx a red\nbike \n".into());
        let sent = edits(&version, |n| files.get(n).cloned());
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].path.as_str(), sent[0].caption.as_str()),
            ("clip.mp4", "ohwx a red bike")
        );
        // A file gone is no edit.
        files.remove("a.txt");
        assert_eq!(edits(&version, |n| files.get(n).cloned()).len(), 1);
    }

    #[test]
    fn paths_that_leave_the_folder_are_refused() {
        assert_eq!(text_file("sub/a.png").unwrap(), "sub/a.txt");
        for bad in ["../a.png", "/etc/a.png", "", "a\\..\\b.png", "./a.png"] {
            assert!(text_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn captions_print_one_line_per_file() {
        let text = captions_text(&captions());
        assert!(
            text.starts_with("job j-1  captions version 3  (2 files)\n"),
            "{text}"
        );
        assert!(text.contains("clip.mp4  ohwx b  (template)"), "{text}");
    }
}
