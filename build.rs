//! Names the build for `cdcflow_build_info` and `--version`: the git commit (or
//! `CDCFLOW_GIT_SHA` when built outside a checkout, as in the Docker image) and the compiler.

use std::process::Command;

fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    let git_sha = std::env::var("CDCFLOW_GIT_SHA")
        .ok()
        .filter(|sha| !sha.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = output(&rustc, &["--version"])
        .and_then(|version| version.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CDCFLOW_GIT_SHA={git_sha}");
    println!("cargo:rustc-env=CDCFLOW_RUSTC_VERSION={rustc_version}");
    println!("cargo:rerun-if-env-changed=CDCFLOW_GIT_SHA");
    // The commit changes with HEAD (and with the branch it points to).
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
