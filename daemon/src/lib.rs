//! The vireo daemon (`vireo serve`): VM definitions and their runtime state
//! in SQLite, one `vireo run` child process per running VM, and a JSON REST
//! API on a Unix socket (`api`, described by the OpenAPI document `openapi`
//! generates from its handlers and types).
//!
//! The API's types and the checks a definition must pass are
//! `vireo_api::model`, shared with the `vireo vm` client; the daemon links
//! no hypervisor, VM core or device crate.
//!
//! Layout: [`paths`] (default state directory and socket), [`clock`]
//! (timestamps), [`db`] (SQLite, migrations), [`vms`] (VM processes,
//! exits, reboots and re-adoption), [`procfs`] (what /proc says of a VM
//! process), [`observe`] (`observe/`: the event bus with the console's
//! kernel-panic tap, the stats samples, the API request counters and the
//! Prometheus text), [`console`] (scrollback, live output, input),
//! [`console_ws`] (the console WebSocket), [`api`] (routes), [`openapi`]
//! (the API's generated OpenAPI document), [`web`] (the
//! embedded web UI), [`storage`] (which host files a definition may
//! name), [`server`] (lock, socket, run loop).

pub mod api;
pub mod auth;
pub mod clock;
pub mod console;
pub mod console_ws;
pub mod db;
pub mod error;
pub mod observe;
pub mod openapi;
pub mod paths;
pub mod procfs;
pub mod ring;
pub mod server;
pub mod storage;
pub mod version;
pub mod vms;
pub mod web;

pub use server::{parse_listen, serve, Listen, ServeConfig, ServeError};
