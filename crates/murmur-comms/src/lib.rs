//! The agent.comms.* coordination record types, generated from Lexicon JSON at build time.
//!
//! Work in progress: see the project issues for what lands here.
