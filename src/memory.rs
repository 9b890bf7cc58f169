//! Keeps the daemon's resident memory close to what it holds.
//!
//! glibc gives each thread that allocates its own arena (up to 8 per core)
//! and keeps freed memory in them. The blocking threads a pass runs on, and
//! a burst of 10,000 attachments, leave tens of MiB of free heap resident
//! long after (measured with `cargo bench --bench e2e`, BENCHMARKS.md).

/// Caps malloc arenas at two (call first thing in `main`).
#[allow(unsafe_code)]
pub fn limit_arenas() {
    // SAFETY: mallopt only sets an allocator tunable; it reads no memory of
    // ours and is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands free heap memory back to the kernel (after a burst of work).
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only releases free chunks the allocator owns; it
    // touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit on open descriptors to the hard one (call first
/// thing in `main`): a node's mounts, watches, scans and clones each hold
/// descriptors, and the soft default (1024 under systemd) is no budget for
/// a storage node. Nothing happens where it cannot be raised.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}
