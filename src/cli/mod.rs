//! Commands of the `cdcflow` binary beyond `run`, `replay` and `check`, and what the binary
//! shows on a terminal.

pub(crate) mod deliver;
pub(crate) mod operate;
pub(crate) mod progress;
