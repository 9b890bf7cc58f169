//! Name rules of the key schema, secret redaction, and key escaping.

/// Volume names, kernel ids and node names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub fn is_valid_object_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Names in a kernel home that vfolderd keeps for itself.
pub const RESERVED_PREFIX: &str = ".vfolderd";

/// Checks a vfolder name or `as` alias: 1–255 bytes, no `/`, NUL or control
/// character, not `.` or `..`. It becomes one path component in a kernel home,
/// so this is what stops an alias from escaping the home (invariant 4).
pub fn check_component_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 255 {
        return Err(format!("name must be 1-255 bytes, got {}", s.len()));
    }
    if s == "." || s == ".." {
        return Err(format!("name {s:?} is not allowed"));
    }
    if let Some(c) = s.chars().find(|c| *c == '/' || c.is_control()) {
        return Err(format!("name {s:?} contains forbidden character {c:?}"));
    }
    // `<home>/.vfolderd` holds the token files: a vfolder bound there would
    // receive them and carry them to storage that others may read.
    if s.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "name {s:?} is reserved: names starting with {RESERVED_PREFIX} hold vfolderd's own files"
        ));
    }
    Ok(())
}

/// Option keys whose values are secrets.
const SECRET_KEYS: &[&str] = &[
    "password",
    "pass",
    "key",
    "accountkey",
    "account_key",
    "sig",
    "sas",
    "token",
    "secret",
];

/// Replaces the values of secret-looking `k=v` pairs (`password=..`, `sig=..`)
/// in free text with `***`, so an error message that echoes user input never
/// carries a secret into status, logs or metrics (invariant 5).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        // The key is the run of key characters before `=`; it starts after
        // the last other character, whose width may be more than one byte.
        let key_start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let key = before[key_start..].to_ascii_lowercase();
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        if SECRET_KEYS.contains(&key.as_str()) {
            let end = after
                .find(|c: char| {
                    c == ',' || c == '&' || c == '"' || c == '\'' || c == '`' || c.is_whitespace()
                })
                .unwrap_or(after.len());
            out.push_str("***");
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Escapes a key for `P/status/nodes/<node>/rejected/<escaped>`: bytes outside
/// `[A-Za-z0-9._-]` become `%XX`.
pub fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_follow_the_schema() {
        for ok in ["a", "azure-shard-1", "A.b_c-d", &"x".repeat(63)] {
            assert!(is_valid_object_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", &"x".repeat(64), "ä"] {
            assert!(!is_valid_object_name(bad), "{bad}");
        }
    }

    #[test]
    fn component_names_cannot_escape() {
        for bad in ["", ".", "..", "a/b", "a\0b", "a\nb", &"x".repeat(256)] {
            assert!(check_component_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["my data", "..a", "ü-ñ", "x.y"] {
            assert!(check_component_name(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn redact_hides_secret_values_only() {
        let s = redact("vers=3.0,username=bob,password=hunter2,sec=ntlmssp");
        assert_eq!(s, "vers=3.0,username=bob,password=***,sec=ntlmssp");
        assert_eq!(
            redact("https://a/b?sv=1&sig=abc%2F&se=2"),
            "https://a/b?sv=1&sig=***&se=2"
        );
        assert_eq!(redact("no secrets"), "no secrets");
    }

    /// Issue 11 item 1: `fstype: "é="` in one volume panicked "byte index
    /// is not a char boundary" and took the node down.
    #[test]
    fn redact_handles_a_multibyte_character_before_an_equals_sign() {
        assert_eq!(redact("é="), "é=");
        assert_eq!(
            redact("fstype é=x, ü password=s3cret"),
            "fstype é=x, ü password=***"
        );
        assert_eq!(redact("日本password=x"), "日本password=***");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any UTF-8 text: no panic, and a secret written after it never survives.
        #[test]
        fn redact_never_panics_and_hides_what_follows_a_secret_key(
            text in "\\PC*",
            secret in "[A-Za-z0-9]{6,20}",
        ) {
            let _ = redact(&text);
            let _ = escape_key(&text);
            let _ = check_component_name(&text);
            let _ = is_valid_object_name(&text);
            let out = redact(&format!("{text} password={secret}"));
            proptest::prop_assert!(out.ends_with("password=***"), "{out}");
        }

        /// Arbitrary characters around `=`, multi-byte ones most of all.
        #[test]
        fn redact_never_panics_on_equals_signs_between_wide_characters(
            parts in proptest::collection::vec("[é日\\u{1F600}a-z=,& ]{0,6}", 0..8),
        ) {
            let _ = redact(&parts.join("="));
        }
    }

    #[test]
    fn escape_key_encodes_slashes_and_spaces() {
        assert_eq!(escape_key("volumes/a b"), "volumes%2Fa%20b");
    }
}
