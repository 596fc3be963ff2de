//! The compiled protobuf descriptors of every contract (imports included),
//! for reflection, compatibility checks and schema registries.

use std::sync::OnceLock;

use oona_core::{Error, ErrorKind, Result};
use prost_reflect::DescriptorPool;

/// The encoded `google.protobuf.FileDescriptorSet` of `proto/` (with source
/// info and imports), as built by protox.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/oona_descriptor_set.bin"));

/// The descriptor pool of every contract, decoded once.
pub fn descriptor_pool() -> Result<&'static DescriptorPool> {
    static POOL: OnceLock<std::result::Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("embedded descriptor set: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_every_contract() {
        let pool = descriptor_pool().unwrap();
        for c in crate::contracts() {
            assert!(pool.get_message_by_name(c.schema).is_some(), "{}", c.schema);
        }
        assert!(pool.get_message_by_name("oona.v1.Envelope").is_some());
    }
}
