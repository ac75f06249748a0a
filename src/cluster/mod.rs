//! Cluster engines over the same archive: the catalog DDL that lets Hive,
//! Glue, Athena and Drill read the layout ([`catalog`]), and the resources an
//! EMR cluster needs to run Drill over it ([`resources`]), the cluster itself
//! ([`emr`]), and replays whose selection runs on Drill ([`drill`]).

pub mod catalog;
pub mod drill;
pub mod emr;
pub mod live;
pub mod resources;
