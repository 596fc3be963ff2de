//! Write the compiled `google.protobuf.FileDescriptorSet` of `proto/` (with
//! imports) to a file, for tools in other languages:
//!
//! ```text
//! cargo run -p oona-contracts --example descriptor_set -- /tmp/oona.binpb
//! ```

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "oona_descriptor_set.binpb".into());
    std::fs::write(&path, oona_contracts::descriptors::FILE_DESCRIPTOR_SET)?;
    println!("{path}");
    Ok(())
}
