//! The control plane's messages and service stubs, generated from `proto/coordinator.proto`.

#![allow(clippy::all, missing_docs)]
tonic::include_proto!("alexnet.v1");

/// The version every process of a job must share (part of the registration handshake).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl From<crate::train::fit::Hits> for Hits {
    fn from(h: crate::train::fit::Hits) -> Self {
        Hits {
            top1: h.top1,
            top5: h.top5,
            samples: h.samples,
        }
    }
}

impl From<Hits> for crate::train::fit::Hits {
    fn from(h: Hits) -> Self {
        crate::train::fit::Hits {
            top1: h.top1,
            top5: h.top5,
            samples: h.samples,
        }
    }
}
