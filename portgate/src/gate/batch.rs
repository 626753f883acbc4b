//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH`: one syscall per chunk of entries instead of
//! two per entry (`get_next_key`, then `lookup`), which is what aya 0.14's iterators do
//! (it has no batch operations). A scrape of 10,000 ports reads 10,000 counter rows and
//! 10,000 slot rows; one by one that is 30,000 syscalls held under the manager's lock.
//! And many writes with `BPF_MAP_UPDATE_BATCH`, which a map of maps needs: the kernel waits
//! for an RCU grace period after each update of one, but once per batch (Linux 6.7 and
//! later; before, once per entry).
//!
//! Batch operations exist since Linux 5.6 for hash maps (per-CPU ones and maps of maps
//! included) and arrays.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per syscall.
const CHUNK: u32 = 4096;

/// Calls `on_entry(key, value)` for every entry of the map behind `fd`, whose keys are
/// `key_size` bytes and whose values (all CPUs' copies, for a per-CPU map) are
/// `value_size` bytes, until it returns `false`. `start`, when given, is the batch token to
/// start after (for an array: the index before the first one read).
pub(super) fn lookup_all(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    start: Option<u32>,
    mut on_entry: impl FnMut(&[u8], &[u8]) -> bool,
) -> io::Result<()> {
    let chunk = CHUNK as usize;
    let mut keys = vec![0_u8; key_size * chunk];
    let mut values = vec![0_u8; value_size * chunk];
    // The kernel's token is a u32 (hash bucket or array index); room for a key as well.
    let token_size = key_size.max(8);
    let mut in_batch = vec![0_u8; token_size];
    let mut out_batch = vec![0_u8; token_size];
    let mut first = true;
    if let Some(index) = start {
        in_batch[..4].copy_from_slice(&index.to_ne_bytes());
        first = false;
    }
    let raw_fd = raw_fd(fd)?;
    loop {
        // SAFETY: bpf_attr is a plain C union of integers; all zero is its empty value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the `batch` member of the union, as BPF_MAP_LOOKUP_BATCH reads it.
        let batch = unsafe { &mut attr.batch };
        batch.in_batch = if first { 0 } else { in_batch.as_ptr() as u64 };
        batch.out_batch = out_batch.as_mut_ptr() as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = CHUNK;
        batch.map_fd = raw_fd;
        // SAFETY: the buffers the attributes point to are as large as `count` entries of
        // the map's key and value sizes, and the tokens as large as the kernel writes;
        // they outlive the call.
        let error = unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        // SAFETY: reading back the member the kernel filled in.
        let count = unsafe { attr.batch.count } as usize;
        for i in 0..count.min(chunk) {
            let more = on_entry(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
            if !more {
                return Ok(());
            }
        }
        match error {
            // The end of the map: the last entries came with it.
            Some(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(err) => return Err(err),
            None => {}
        }
        std::mem::swap(&mut in_batch, &mut out_batch);
        first = false;
    }
}

/// Writes `keys[i]` -> `values[i]` for every entry (`count` of them, each key `key_size`
/// bytes and each value `value_size` bytes) into the map behind `fd`, in one syscall.
/// On an error, the entries before the failing one are written.
pub(super) fn update_all(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> io::Result<()> {
    let raw_fd = raw_fd(fd)?;
    let count = u32::try_from(count).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // SAFETY: bpf_attr is a plain C union of integers; all zero is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the `batch` member of the union, as BPF_MAP_UPDATE_BATCH reads it.
    let batch = unsafe { &mut attr.batch };
    batch.keys = keys.as_ptr() as u64;
    batch.values = values.as_ptr() as u64;
    batch.count = count;
    batch.map_fd = raw_fd;
    // SAFETY: the buffers hold `count` keys and values of the map's sizes (the caller's
    // contract) and outlive the call; the kernel only reads them.
    unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// `fd` as the `bpf()` attributes hold a descriptor.
pub(super) fn raw_fd(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// The `bpf()` syscall with command `cmd` and attributes `attr`: what it returned (a new
/// descriptor, for the commands that make one).
///
/// # Safety
///
/// Every pointer in `attr` points to memory as large as `cmd` reads or writes, valid for
/// the call.
pub(super) unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is a whole `bpf_attr`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}
