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

/// Option keys whose values are secrets (see [`is_secret_key`]).
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

/// Whether the value of option `key` (lowercase) is a secret: one of
/// [`SECRET_KEYS`] or ending in one (`apikey`, `x-sig`: a word glued to the
/// key must not hide it), or holding `pass` or `secret`.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| key.ends_with(k)) || key.contains("pass") || key.contains("secret")
}

/// Shortest run of base64 characters taken for a pasted key (an Azure
/// account key is 88, a SAS signature 44, a GUID-free client secret 40).
const KEY_LIKE_LEN: usize = 40;

/// Replaces secrets in free text with `***`, so an error message that echoes
/// user input never carries one into status, logs or metrics (invariant 5):
/// the values of secret-looking `k=v` pairs (`password=..`, `sig=..`), and
/// anything that looks like a pasted key — a run of at least 40 base64
/// characters mixing upper case, lower case and digits.
pub fn redact(text: &str) -> String {
    redact_key_like(&redact_pairs(text))
}

fn redact_pairs(text: &str) -> String {
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
        if is_secret_key(&key) {
            out.push_str("***");
            rest = &after[secret_end(after)..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where a secret value ends: at a separator, except `,,`, which is a comma
/// inside the value (mount.cifs's escape).
fn secret_end(value: &str) -> usize {
    let b = value.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b',' if b.get(i + 1) == Some(&b',') => i += 2,
            b',' | b'&' | b'"' | b'\'' | b'`' => return i,
            c if c.is_ascii_whitespace() => return i,
            _ => i += 1,
        }
    }
    b.len()
}

fn redact_key_like(text: &str) -> String {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    let mut out = String::with_capacity(text.len());
    let mut run_start = None;
    let flush = |out: &mut String, run: &str| {
        let mixed = run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_lowercase())
            && run.chars().any(|c| c.is_ascii_digit());
        if run.len() >= KEY_LIKE_LEN && mixed {
            out.push_str("***");
        } else {
            out.push_str(run);
        }
    };
    for (i, c) in text.char_indices() {
        match (is_b64(c), run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                flush(&mut out, &text[s..i]);
                run_start = None;
                out.push(c);
            }
            (false, None) => out.push(c),
            (true, Some(_)) => {}
        }
    }
    if let Some(s) = run_start {
        flush(&mut out, &text[s..]);
    }
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

    /// Issue 12 item 5: a base64 account key pasted into a field, a
    /// `password2=` and a password with an escaped comma survived redaction.
    #[test]
    fn redact_hides_pasted_keys_password2_and_escaped_commas() {
        let key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        assert_eq!(
            redact(&format!("unknown field `{key}`")),
            "unknown field `***`"
        );
        assert_eq!(
            redact("password2=s3cret,vers=3.0"),
            "password2=***,vers=3.0"
        );
        assert_eq!(redact("password=a,,b,vers=3.0"), "password=***,vers=3.0");
        let path = "/tmp/vfolderd-e2eLDMnmU/volumes/a_hung_mount_helper_times_out";
        assert_eq!(redact(path), path, "paths and names are not keys");
        let uuid = "0b6b1f3e-55b1-4d7e-9a8c-2f3d4e5f6a7b";
        assert_eq!(redact(uuid), uuid);
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
