//! Test support (a dev-dependency only): per-test PostgreSQL databases cloned from a
//! migrated template, `keyplaned` on port 0 and agents with simulated devices inside
//! the test process.

pub mod pg;
pub mod proxy;
pub mod server;
