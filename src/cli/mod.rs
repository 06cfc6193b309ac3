//! Commands of the `cdcflow` binary beyond `replay` and `check`, and what the binary shows on
//! a terminal.

pub(crate) mod deliver;
pub(crate) mod ingress;
pub(crate) mod operate;
pub(crate) mod poll;
pub(crate) mod progress;
pub(crate) mod reconcile;
pub(crate) mod run;
pub(crate) mod tasks;
