//! The calls that need root, behind one seam.
//!
//! The store's rules (which mode a store gets, what a tar entry may do) are decided
//! here in plain code; the few calls that only root can make go through [`Syscalls`],
//! so those rules are unit-tested without root against a recording fake (`sys::fake::Recorder`, in tests), which
//! records what would have been called and answers as configured. The daemon and
//! `casctl` use [`Host`], the real implementation.

use std::path::Path;

use crate::probe::ProbeError;

/// The calls of the store that need root.
pub trait Syscalls: Send + Sync {
    /// Whether this kernel's overlayfs serves stubs from a data-only lower layer: a
    /// scratch mount under `scratch` (see [`crate::probe`]).
    fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError>;
}

/// The real calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Syscalls for Host {
    fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError> {
        crate::probe::probe_data_only_lowers(scratch)
    }
}

/// A recording fake of [`Syscalls`] for unit tests.
#[cfg(test)]
pub mod fake {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::Syscalls;
    use crate::probe::ProbeError;

    /// One call the fake received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// [`Syscalls::probe_data_only_lowers`] with this scratch directory.
        Probe(PathBuf),
    }

    /// Records calls; the probe succeeds when `data_only` is set.
    #[derive(Debug, Default)]
    pub struct Recorder {
        /// Whether the probe finds data-only lower layers.
        pub data_only: bool,
        /// Every call, in order.
        pub calls: Mutex<Vec<Call>>,
    }

    impl Recorder {
        /// A fake kernel with (`true`) or without data-only lower layers.
        pub fn new(data_only: bool) -> Recorder {
            Recorder {
                data_only,
                calls: Mutex::default(),
            }
        }

        /// The calls so far.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Syscalls for Recorder {
        fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Probe(scratch.to_path_buf()));
            if self.data_only {
                Ok(())
            } else {
                Err(ProbeError::Mount {
                    options: "metacopy=on,lowerdir=stubs::data".into(),
                    errno: nix::errno::Errno::EINVAL,
                })
            }
        }
    }
}
