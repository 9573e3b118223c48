//! The atproto event-stream wire and its trust: frames, hash-checked CAR slices, commit verification, identity.
//!
//! Work in progress: see the project issues for what lands here.
