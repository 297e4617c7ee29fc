//! Rate limits, quotas and usage: the pure arithmetic (window.rs, quota.rs, entry.rs), the
//! shared state verify records into (shmem.rs over dshash.rs) and the verify-time
//! enforcement (enforce.rs).

pub mod batch;
pub mod dshash;
pub mod enforce;
pub mod entry;
pub mod quota;
pub mod shmem;
pub mod window;
