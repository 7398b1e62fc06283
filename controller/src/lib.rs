//! The cluster controller. The allocator and reconcilers land with the controller issue.
#![forbid(unsafe_code)]
