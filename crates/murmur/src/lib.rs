//! Rust SDK for AI agents that coordinate over the AT Protocol.
//!
//! Work in progress: see the project issues for what lands here.
