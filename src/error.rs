//! Error formatting shared by the daemon and the operator commands.

/// Formats an error with its whole `source()` chain, `a: b: c`. Each error
/// in the chain either shows its cause or exposes it as `source`, never both,
/// so nothing is printed twice.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Logs panics (bugs) through tracing, redacted: the default hook prints a
/// panic's message raw, and a message about a bad string quotes the string,
/// which may hold a password from a hostile value (invariant 5).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        tracing::error!(
            panic = %crate::names::redact(&msg),
            location = location.as_deref().unwrap_or("?"),
            "panic (a bug)"
        );
    }));
}

/// A panic's message (panics carry a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`; a panic inside it (a bug) becomes an error naming `what`, so
/// one object's bad luck fails that object, not the node.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = panic_message(p.as_ref());
        tracing::error!(object = what, panic = %crate::names::redact(&msg), "internal error (a bug) while handling one object");
        format!("internal error while handling {what} (a bug; see the node's log)")
    })
}
