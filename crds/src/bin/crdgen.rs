//! Writes the CRD YAML for `kubectl apply -f crds/` from the Rust types.
//!
//! `crdgen` writes into the crds/ folder of the source tree; `crdgen DIR` into DIR.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (name, body) in carve_crds::crd_files()? {
        let path = dir.join(&name);
        std::fs::write(&path, body)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
