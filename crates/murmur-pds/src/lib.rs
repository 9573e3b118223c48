//! The murmur writer: typed, validated, retry-safe record writes to an atproto PDS.
//!
//! Work in progress: see the project issues for what lands here.
