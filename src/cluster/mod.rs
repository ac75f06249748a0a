//! Cluster engines over the same archive: the catalog DDL that lets Hive,
//! Glue, Athena and Drill read the layout ([`catalog`]), and the resources an
//! EMR cluster needs to run Drill over it ([`resources`]), and the cluster
//! itself ([`emr`]).

pub mod catalog;
pub mod emr;
pub mod resources;
