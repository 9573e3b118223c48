//! The murmur watcher: repo event-stream sources, cursors, filters and typed handler dispatch.
//!
//! Work in progress: see the project issues for what lands here.
