//! End-to-end scenarios: a real PostgreSQL (one database per test), `keyplaned` on a
//! real TCP socket, the real agent code, and simulated devices whose state lives on
//! disk apart from the agent.

mod agent;
mod api;
mod audit;
mod authority;
mod bad_input;
mod big_site;
mod by_hand;
mod change_window;
mod citus_schema;
mod clock;
mod compat;
mod dealer_tokens;
mod deploy;
mod doors;
mod edges;
mod enroll;
mod events;
mod faults;
mod fixture;
mod fuzz_admin;
mod fuzz_wire;
mod interleavings;
mod isolation;
mod keys;
mod limits;
mod local;
mod metrics;
mod ops;
mod otel;
mod outage;
mod panel;
mod race;
mod readme;
mod redaction;
mod restart;
mod retention;
mod round_trips;
mod schedules;
mod seed000;
mod shutdown;
mod site_changes;
mod status;
mod tls;
mod zwave;
