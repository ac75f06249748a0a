//! Cluster engines over the same archive: the catalog DDL that lets Hive,
//! Glue, Athena and Drill read the layout ([`catalog`]). (Launching EMR
//! clusters with Drill is not done yet.)

pub mod catalog;
