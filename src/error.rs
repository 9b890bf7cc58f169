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
