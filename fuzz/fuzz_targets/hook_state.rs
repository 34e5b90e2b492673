//! Whatever a runtime (or anyone) writes to the hook's stdin: the parser must never
//! panic, and what it accepts must be a usable state.
#![no_main]

use dove_hook::state::read_state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = read_state(data) {
        assert!(!state.id.is_empty());
        assert_ne!(state.pid, Some(0));
    }
});
