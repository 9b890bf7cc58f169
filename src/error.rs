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
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
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
