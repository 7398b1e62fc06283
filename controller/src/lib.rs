//! carve's cluster controller.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod index;
pub mod selector;
