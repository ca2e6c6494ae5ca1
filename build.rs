//! Stamps the build with its git commit and profile, for `--version`, the
//! start-up line and `portcullis_build_info`.
//!
//! Git is optional: a crate tarball or a container build copies the
//! sources without `.git` (or without git), and then the commit is
//! "unknown". The build never fails for want of it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // Cargo's own notion: "release" for release and the profiles that
    // inherit it (dist), "debug" for the rest.
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=PORTCULLIS_BUILD_PROFILE={profile}");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match git_commit(&manifest) {
        Some((commit, watched)) => {
            for path in watched {
                println!("cargo:rerun-if-changed={}", path.display());
            }
            // A source edit can make the tree dirty without touching .git.
            println!("cargo:rerun-if-changed=src");
            println!("cargo:rerun-if-changed=Cargo.toml");
            commit
        }
        None => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=PORTCULLIS_GIT_COMMIT={commit}");
}

/// The short hash of HEAD, `-dirty` when tracked files differ from it, and
/// the files whose change means HEAD moved; `None` outside a git checkout
/// of this crate (a tarball unpacked inside some other repository included).
fn git_commit(manifest: &Path) -> Option<(String, Vec<PathBuf>)> {
    let top = git(manifest, &["rev-parse", "--show-toplevel"])?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same(Path::new(&top), manifest) {
        return None;
    }
    let hash = git(manifest, &["rev-parse", "--short=12", "HEAD"])?;
    let dirty = git(manifest, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let mut watched = Vec::new();
    // In a worktree `.git` is a file: ask git where HEAD, the index and
    // the refs live.
    if let Some(dir) = git(manifest, &["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        watched.push(dir.join("HEAD"));
        watched.push(dir.join("index"));
    }
    if let (Some(common), Some(name)) = (
        git(manifest, &["rev-parse", "--git-common-dir"]),
        git(manifest, &["symbolic-ref", "-q", "HEAD"]),
    ) {
        let common = manifest.join(common);
        watched.push(common.join(name));
        watched.push(common.join("packed-refs"));
    }
    watched.retain(|p| p.exists());
    Some((format!("{hash}{}", if dirty { "-dirty" } else { "" }), watched))
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}
