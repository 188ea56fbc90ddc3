//! Integration tests: the real server on 127.0.0.1:0 with a temporary data
//! directory, spoken to over gRPC. One binary, one module per area.

mod observe_support;
mod support;

mod admin;
mod admin_cli;
mod bench;
mod client;
mod cluster;
mod coordinator;
mod crash;
mod faults;
mod fenced_store;
mod guard_crash;
mod kleppmann;
mod model;
mod observe;
mod page;
mod session;
mod signed;
mod tls;
