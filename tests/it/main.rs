//! The one integration-test binary (fast linking): every test talks to real
//! local servers started by the harness and runs the real `fluxcap` binary.

mod harness;

mod archive_basic;
mod catalog;
mod cluster;
mod compat;
mod config_cli;
mod drill;
mod drill_views;
mod exactly_once;
mod fanout;
mod faults;
mod fencing;
mod ferro;
mod kpl;
mod live_pacing;
mod memory_budget;
mod positions;
mod proxy;
mod publish_hour;
mod replay;
mod replay_follow;
mod replay_large;
mod replay_order;
mod replay_resume;
mod replay_view;
mod replay_writer;
mod resharding;
mod retention;
mod s3_requests;
mod server;
mod sql;
mod ui;
mod verify_scale;
mod workers;
mod writer_interop;
