//! Rate limits and quotas: the pure arithmetic (window.rs, quota.rs), the shared-memory
//! limiter (shmem.rs, with shared_preload_libraries) and the verify-time enforcement
//! (enforce.rs, which falls back to tables without the preload).

pub mod enforce;
pub mod quota;
pub mod shmem;
pub mod window;
