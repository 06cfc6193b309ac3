//! The checkout under test, shared by tests and benches.
#![allow(unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// The repository root. cargo sets `CARGO_MANIFEST_DIR` when it runs a test or a bench; read
/// at run time it names this checkout even when several checkouts share one cargo target dir
/// and a binary built from another checkout is reused.
pub fn root() -> &'static Path {
    static ROOT: LazyLock<PathBuf> = LazyLock::new(|| {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
    });
    &ROOT
}
