//! A time-bounded fuzzer over everything an etcd write reaches before a
//! mount: `parse_volume`, `parse_kernel`, policy source matching and
//! `redact`. cargo-fuzz needs a nightly toolchain and libFuzzer, which this
//! project's machines do not have; proptest's generators, run in a loop until
//! the budget is spent, take their place. Inputs are built from hostile
//! fragments (traversal, option injection, URL tricks, multi-byte text,
//! secrets) so that most of them get past YAML and reach the checks.
//!
//! `FUZZ_SECONDS` (default 20) sets the budget; `scripts/test.sh` runs it
//! with the suite. A failure prints the input; proptest shrinks it first.

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vfolderd::names::redact;
use vfolderd::policy::source::{split_source, SourcePattern};
use vfolderd::policy::Policy;
use vfolderd::spec::{parse_kernel, parse_vfolder, parse_volume, KernelMount};

/// The secret every generated input may carry; it must never come back.
const SECRET: &str = "Zq7Secret";

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// Runs `test` on values of `strategy` until a fifth of the budget is spent
/// (five targets share it).
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let deadline = Instant::now() + budget() / 5;
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 2_000,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        rounds += 1;
    }
    eprintln!("{name}: {rounds} rounds of 2,000 cases, nothing found");
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just("/".to_string()),
        Just("//".to_string()),
        Just("-o".to_string()),
        Just(",".to_string()),
        Just(",,".to_string()),
        Just("=".to_string()),
        Just("#".to_string()),
        Just("?".to_string()),
        Just("@".to_string()),
        Just(":".to_string()),
        Just("*".to_string()),
        Just(".vfolderd".to_string()),
        Just(format!("password={SECRET}")),
        Just(format!("sig={SECRET}")),
        Just("é".to_string()),
        Just("日本".to_string()),
        Just("\u{202e}".to_string()),
        Just("\\".to_string()),
        Just("https://".to_string()),
        Just(".file.core.windows.net".to_string()),
        Just(".blob.core.windows.net".to_string()),
        Just("/srv/vfolderd".to_string()),
        "[a-zA-Z0-9._-]{1,8}",
        any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ]
}

fn hostile() -> impl Strategy<Value = String> {
    proptest::collection::vec(fragment(), 0..8).prop_map(|v| v.concat())
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn volume_value() -> impl Strategy<Value = String> {
    let fstype = prop_oneof![
        Just("cifs"),
        Just("nfs"),
        Just("bind"),
        Just("tmpfs"),
        Just("azureblob"),
        Just("ext4"),
    ];
    (
        fstype,
        hostile(),
        hostile(),
        proptest::option::of(hostile()),
        any::<bool>(),
    )
        .prop_map(|(fstype, path, options, credentials, startup)| {
            let at = if startup { "startup" } else { "requested" };
            let creds = credentials.map_or(String::new(), |c| {
                format!(", credentials: {}", yaml_str(&c))
            });
            format!(
                "mount: {{at: {at}, fstype: {fstype}, path: {}, options: {}{creds}}}\n",
                yaml_str(&path),
                yaml_str(&options)
            )
        })
}

fn kernel_value() -> impl Strategy<Value = String> {
    let mount = prop_oneof![
        hostile().prop_map(|a| format!(
            "{{vfolder: 0b6b1f3e-55b1-4d7e-9a8c-2f3d4e5f6a7b, as: {}}}",
            yaml_str(&a)
        )),
        hostile().prop_map(|v| format!("{{volume: {}, token: write}}", yaml_str(&v))),
    ];
    (
        proptest::option::of(hostile()),
        proptest::collection::vec(mount, 0..4),
    )
        .prop_map(|(home, mounts)| {
            let home = home.map_or(String::new(), |h| format!("home: {}\n", yaml_str(&h)));
            format!("{home}mounts: [{}]\n", mounts.join(", "))
        })
}

fn shipped_policy() -> Policy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    Policy::load_dir(&dir)
        .expect("the shipped policy loads")
        .expect("policies/default.yaml")
}

#[test]
fn volume_values_never_panic_leak_or_pass_a_dirty_source() {
    let policies = [Policy::default(), shipped_policy()];
    fuzz("parse_volume", volume_value(), |value| {
        for policy in &policies {
            match parse_volume("v", value.as_bytes(), policy) {
                Err(e) => prop_assert!(!e.to_string().contains(SECRET), "{e}"),
                Ok(spec) => {
                    let fstype = spec.mount.fstype.as_str();
                    let source = &spec.mount.path;
                    prop_assert!(split_source(fstype, source).is_ok(), "{source}");
                    prop_assert!(!source.starts_with('-'));
                    prop_assert!(!spec.option_list().iter().any(|o| o.starts_with('-')));
                    if fstype == "bind" {
                        prop_assert!(!source.split('/').any(|c| c == ".."), "{source}");
                    }
                }
            }
        }
        Ok(())
    });
}

#[test]
fn kernel_values_never_panic_and_stay_in_their_home() {
    let root = Path::new("/k");
    fuzz("parse_kernel", kernel_value(), |value| {
        match parse_kernel("k1", value.as_bytes(), root) {
            Err(e) => prop_assert!(!e.contains(SECRET), "{e}"),
            Ok(k) => {
                prop_assert!(k.home.starts_with(root), "{}", k.home.display());
                for m in &k.mounts {
                    if let KernelMount::Vfolder { alias: Some(a), .. } = m {
                        prop_assert!(!a.contains('/') && a != ".." && a != ".");
                        prop_assert!(!a.starts_with(".vfolderd"), "{a}");
                    }
                }
            }
        }
        Ok(())
    });
}

#[test]
fn vfolder_records_never_panic_or_leak() {
    let record = (hostile(), hostile(), hostile()).prop_map(|(name, owner, volume)| {
        format!(
            "{{name: {}, owner: {}, volume: {}}}\n",
            yaml_str(&name),
            yaml_str(&owner),
            yaml_str(&volume)
        )
    });
    fuzz("parse_vfolder", record, |value| {
        match parse_vfolder(value.as_bytes()) {
            Err(e) => prop_assert!(!e.contains(SECRET), "{e}"),
            Ok(v) => {
                prop_assert!(!v.name.contains('/') && !v.name.starts_with(".vfolderd"));
            }
        }
        Ok(())
    });
}

#[test]
fn shipped_source_patterns_admit_only_what_they_say() {
    let cifs = SourcePattern::compile("cifs", "//*.file.core.windows.net/**").unwrap();
    let blob = SourcePattern::compile("azureblob", "https://*.blob.core.windows.net/*").unwrap();
    let bind = SourcePattern::compile("bind", "/srv/vfolderd/**").unwrap();
    fuzz("source patterns", hostile(), |s| {
        let variants = [
            ("cifs", &cifs, format!("//{s}")),
            ("azureblob", &blob, format!("https://{s}")),
            ("bind", &bind, format!("/srv/vfolderd/{s}")),
        ];
        for (fstype, pattern, source) in variants {
            let Ok(parts) = split_source(fstype, &source) else {
                continue;
            };
            if !pattern.matches(&parts) {
                continue;
            }
            let host = parts.host.clone().unwrap_or_default();
            match fstype {
                "cifs" => prop_assert!(host.ends_with(".file.core.windows.net"), "{source}"),
                "azureblob" => {
                    prop_assert!(host.ends_with(".blob.core.windows.net"), "{source}");
                    prop_assert!(!parts.path.contains('/'), "{source}");
                }
                _ => prop_assert!(
                    !source.split('/').any(|c| c == ".." || c == "."),
                    "{source}"
                ),
            }
        }
        Ok(())
    });
}

#[test]
fn redact_never_panics_and_hides_secret_values() {
    fuzz("redact", (hostile(), hostile()), |(before, after)| {
        let text = format!("{before} password={SECRET} {after}");
        let out = redact(&text);
        // The value after `password=` is gone, unless the text repeats it elsewhere.
        let elsewhere = before.contains(SECRET) || after.contains(SECRET);
        prop_assert!(elsewhere || !out.contains(SECRET), "{text:?} -> {out:?}");
        Ok(())
    });
}
