//! `dove-hook`'s parts that are worth testing (and fuzzing) on their own; the binary is
//! `src/main.rs`.

pub mod state;
