//! Small utilities shared by several services (the vault, the link's cache service, the
//! agent's runtime). They sit below all of them and depend on nothing above `error`, so no
//! service has to reach into another one for a lock file or a name check.

pub mod codec;
pub mod hold;
pub mod latency;
pub mod lock;
pub mod names;
pub mod statefile;
pub mod testhook;
