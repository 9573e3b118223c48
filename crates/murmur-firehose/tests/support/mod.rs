//! Shared by the offline tests.

pub mod corpus;
