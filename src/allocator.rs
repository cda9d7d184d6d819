//! Settings of the memory allocator the binaries use (mimalloc).
//!
//! Training on the CPU backend allocates and frees activation-sized buffers (tens of MB) in
//! every layer. mimalloc returns freed memory to the operating system after 10 ms by default,
//! so the next step faults every page in again: on a 2-core machine that was a third of the
//! time of a MobileNetV2 step, in the kernel. Keeping freed memory for 10 s lets steps reuse
//! it; an idle window still gives it back.

/// mimalloc's `mi_option_purge_delay` (position in its `mi_option_e`, version 3 headers; the
/// version is pinned by Cargo.lock).
const PURGE_DELAY_OPTION: libmimalloc_sys::mi_option_t = 15;
/// Milliseconds freed memory stays with the process before it goes back to the system.
const PURGE_DELAY_MS: std::os::raw::c_long = 10_000;

/// Applies the settings; call at the start of `main` in binaries whose global allocator is
/// `mimalloc::MiMalloc`.
pub fn configure() {
    // SAFETY: sets a plain integer option; mimalloc reads it when it decides to purge.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY_OPTION, PURGE_DELAY_MS) };
}
