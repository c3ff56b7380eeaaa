//! The keyplane benchmark suite's library part: the report (figures, baselines,
//! targets) built by `keyplane-load report` for `cargo xtask bench`.

pub mod report;
