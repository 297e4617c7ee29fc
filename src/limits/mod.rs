//! Rate limits and quotas: the pure arithmetic (window.rs, quota.rs) and the verify-time
//! enforcement over tables (enforce.rs).

pub mod enforce;
pub mod quota;
pub mod window;
