//! Cluster engines over the same archive: the catalog DDL that lets Hive,
//! Glue, Athena and Drill read the layout ([`catalog`]), and the resources an
//! EMR cluster needs to run Drill over it ([`resources`]). (Launching and
//! managing EMR clusters from the tool is not done yet.)

pub mod catalog;
pub mod resources;
