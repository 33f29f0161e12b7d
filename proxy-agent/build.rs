//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so that a node needs
//! only the agent binary.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("FERRY_EBPF_OBJECT").map_or_else(
        || manifest.join("../target/ebpf/bpfel-unknown-none/release/proxy-ebpf"),
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("ferry.bpf.o");
    if let Err(error) = fs::copy(&object, &out) {
        panic!(
            "cannot read the eBPF object {} ({error}): run `cargo xtask build-ebpf` first, \
             or point FERRY_EBPF_OBJECT at a built object",
            object.display()
        );
    }
}
