//! Any text as a manifest: read, turned into a node's frontends and into map
//! contents, without a panic, and with every object either read or named as
//! left out.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_agent::{
    desired::{self, Ids},
    frontend::Scheduler,
    k8s::manifests::Manifests,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut manifests = Manifests::default();
    if manifests.add_text("input", text).is_err() {
        return;
    }
    let node = manifests.node("node-a");
    let served = manifests.frontends(&node, Scheduler::default());
    let (state, _problems) = desired::map_state(&served.frontends, &mut Ids::default());
    desired::apply::check_whole(&state).expect("a frontend with a hole");
});
