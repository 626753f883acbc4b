//! Atomic read-modify-write on map values, shared by every CPU (and, from process context,
//! by programs that may be preempted).
//!
//! BPF has atomic fetch-and-add and compare-and-exchange from CPU v3 (kernel 5.12), but
//! aya-build links for the default CPU (v1), where LLVM refuses to use an atomic's result,
//! and it owns the flags that would select v3. So these are written in BPF assembly, which
//! the kernel's verifier accepts on any CPU setting.
//!
//! SAFETY (every function): `field` points into a live map value, 8-byte aligned, and every
//! writer of that field in the kernel is one of these atomic instructions.

use core::arch::asm;

/// Adds `value`; returns what the field held before.
#[inline(always)]
pub fn fetch_add(field: *mut u64, value: u64) -> u64 {
    let mut value = value;
    // SAFETY: see the module's docs.
    unsafe {
        asm!(
            "{value} = atomic_fetch_add((u64 *)({field} + 0), {value})",
            field = in(reg) field,
            value = inout(reg) value,
        );
    }
    value
}

/// Replaces `current` with `new` if the field still holds `current`; returns whether it
/// did.
#[inline(always)]
pub fn compare_exchange(field: *mut u64, current: u64, new: u64) -> bool {
    let mut seen = current;
    // SAFETY: see the module's docs.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({field} + 0, r0, {new})",
            field = in(reg) field,
            new = in(reg) new,
            inout("r0") seen,
        );
    }
    seen == current
}

/// The field's value, read whole (an aligned u64 read is never torn).
#[inline(always)]
pub fn load(field: *const u64) -> u64 {
    // SAFETY: see the module's docs.
    unsafe { field.read_volatile() }
}
