//! Shared support for the workspace end-to-end tests.
