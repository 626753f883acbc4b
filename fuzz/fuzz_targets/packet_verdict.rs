//! The kernel's packet verdict against the userspace verdict, on any frames: each is run
//! through a kernel program with `BPF_PROG_TEST_RUN` on a gate loaded once per process
//! (`portgate_fuzz::harness`, needs root), and through the userspace verdict after the
//! reference reading of its headers (`portgate_fuzz::frame`). They must agree on whether
//! it passes and, when it is dropped, on the reason its deny event gives.
//!
//! An input is a sequence of up to 16 frames, each as a control byte (bit 0: `cgroup_skb`
//! rather than XDP; bit 1: XDP sees it in the container's namespace), a length byte and
//! the frame from its Ethernet header (cut short where the input ends). The frames of one
//! input share the connection slots and reservations of the limited ports.
//!
//! Where the two legitimately differ, the harness models or leaves it (docs/fuzzing.md):
//! a SYN of a flow already holding a reservation passes on it; Accept and Pass are not
//! told apart (a test run says only pass or drop); a frame under an Ethernet header is not
//! run (the kernel refuses it); `cgroup_skb` does not read a VLAN tag.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use portgate_fuzz::{
    frame::Hook,
    harness::{self, Harness},
};

const MAX_FRAMES: usize = 16;

static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
static PINS: OnceLock<std::path::PathBuf> = OnceLock::new();

extern "C" fn clean_up() {
    if let Some(pins) = PINS.get() {
        harness::uninstall(pins);
    }
}

fn harness() -> &'static Mutex<Harness> {
    HARNESS.get_or_init(|| {
        let harness = Harness::install();
        let _ = PINS.set(harness.pins().to_owned());
        // libFuzzer ends the process with exit(): the gate is uninstalled then. A crash
        // leaves it to the next run (`Harness::install` removes a dead process's pins).
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(clean_up) };
        Mutex::new(harness)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut harness = harness()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    harness.start_input();
    let mut rest = data;
    for _ in 0..MAX_FRAMES {
        let [control, len, tail @ ..] = rest else {
            break;
        };
        let (frame, after) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = after;
        let hook = if control & 1 == 0 {
            Hook::Xdp
        } else {
            Hook::CgroupSkb
        };
        let in_container = control & 2 != 0;
        if let Err(divergence) = harness.judge(hook, in_container, frame) {
            panic!(
                "the kernel and the userspace verdict differ on a frame for {hook:?}{}: \
                 {divergence:?}\nframe: {frame:02x?}",
                if in_container {
                    " in the container"
                } else {
                    ""
                }
            );
        }
    }
});
