//! Hostile and malformed desired state, policy hot reload, and secrets: what
//! anyone who can write an etcd key can and cannot make a root daemon do.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Every file (not directory) under `dir`, symlinks not followed.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// Every directory and file under `dir` (to prove nothing was created outside the roots).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_hostile_objects_are_rejected_naming_why_and_the_good_ones_converge() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let policy_dir = node.dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        let outside = node.dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let before_outside = tree(&outside);

        let good = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/volumes/good"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/vfolders/{good}"),
            "{name: data, owner: alice, volume: good}\n",
        )
        .await;
        let big = "x".repeat(1 << 20);
        let huge_name = "n".repeat(300);
        // (key suffix after P, value, what the reason must mention)
        let vol = |v: &str| format!("{P}/volumes/{v}");
        let vf = |v: &str| format!("{P}/vfolders/{v}");
        let k = |v: &str| node.kernel_key(v);
        let id = uuid::Uuid::new_v4();
        let mut cases: Vec<(String, String, &str)> = vec![
            // keys
            (vol("../etc"), tmpfs_volume("startup"), "volume name"),
            (vol("a b"), tmpfs_volume("startup"), "volume name"),
            (vol("-dash"), tmpfs_volume("startup"), "volume name"),
            (vol(".hidden"), tmpfs_volume("startup"), "volume name"),
            (vol("a/b"), tmpfs_volume("startup"), "volume name"),
            (vol(&"v".repeat(64)), tmpfs_volume("startup"), "volume name"),
            (
                vf("not-a-uuid"),
                "{name: d, owner: o, volume: good}".into(),
                "uuid",
            ),
            (
                vf("../../x"),
                "{name: d, owner: o, volume: good}".into(),
                "uuid",
            ),
            (k("../k"), "mounts: []".into(), "kernel id"),
            (k("k one"), "mounts: []".into(), "kernel id"),
            (k("k\u{7}bell"), "mounts: []".into(), "kernel id"),
            // volume values
            (
                vol("v-ext4"),
                "mount: {at: startup, fstype: ext4, path: /dev/vda}".into(),
                "policy fstypes",
            ),
            (
                vol("v-proc"),
                "mount: {at: startup, fstype: proc, path: proc}".into(),
                "policy fstypes",
            ),
            (
                vol("v-suid"),
                "mount: {at: startup, fstype: tmpfs, path: t, options: suid}".into(),
                "suid",
            ),
            (
                vol("v-dev"),
                "mount: {at: startup, fstype: tmpfs, path: t, options: 'size=1m,dev'}".into(),
                "dev",
            ),
            (
                vol("v-unknown"),
                "mount: {at: startup, fstype: tmpfs, path: t, owner: root}".into(),
                "owner",
            ),
            (
                vol("v-toplevel"),
                "mount: {at: startup, fstype: tmpfs, path: t}\nexec: true".into(),
                "exec",
            ),
            (
                vol("v-at"),
                "mount: {at: always, fstype: tmpfs, path: t}".into(),
                "always",
            ),
            (
                vol("v-type"),
                "mount: {at: startup, fstype: [tmpfs], path: t}".into(),
                "invalid type",
            ),
            (
                vol("v-malformed"),
                "mount: {at: startup, fstype: tmpfs".into(),
                "did not find expected",
            ),
            (vol("v-empty"), "".into(), "mount"),
            (vol("v-list"), "[1, 2, 3]".into(), "invalid type"),
            (
                vol("v-name"),
                "name: other\nmount: {at: startup, fstype: tmpfs, path: t}".into(),
                "does not match",
            ),
            (
                vol("v-bindrel"),
                "mount: {at: startup, fstype: bind, path: etc}".into(),
                "absolute",
            ),
            (
                vol("v-cifs"),
                "mount: {at: startup, fstype: cifs, path: 'http://x'}".into(),
                "//host/share",
            ),
            (
                vol("v-nulpath"),
                "mount: {at: startup, fstype: tmpfs, path: \"a\\0b\"}".into(),
                "NUL",
            ),
            (
                vol("v-nlopt"),
                "mount: {at: startup, fstype: tmpfs, path: t, options: \"size=1m\\nsuid\"}".into(),
                "newline",
            ),
            (
                vol("v-nfspw"),
                "mount: {at: startup, fstype: nfs, path: 'h:/x', options: 'password=p'}".into(),
                "password",
            ),
            (
                vol("v-creds"),
                "mount: {at: startup, fstype: cifs, path: '//a/b', credentials: ../../etc/shadow}"
                    .into(),
                "credentials",
            ),
            (
                vol("v-blob"),
                "mount: {at: startup, fstype: azureblob, path: 'file:///etc', credentials: k}"
                    .into(),
                "URL",
            ),
            (
                vol("v-huge"),
                format!("mount: {{at: startup, fstype: tmpfs, path: t, options: '{big}'}}"),
                "at most",
            ),
            // vfolder values
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: '..', owner: o, volume: good}".into(),
                "not allowed",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: 'a/b', owner: o, volume: good}".into(),
                "forbidden character",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: \"a\\0b\", owner: o, volume: good}".into(),
                "forbidden character",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                format!("{{name: {huge_name}, owner: o, volume: good}}"),
                "1-255",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: d, owner: o, volume: '../x'}".into(),
                "volume",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: d, owner: o, volume: good, perm: rw}".into(),
                "perm",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: d, owner: '', volume: good}".into(),
                "owner",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: d, owner: o, volume: good, permission: rwx}".into(),
                "rwx",
            ),
            // kernel values
            (
                k("k-abs"),
                "home: /etc\nmounts: []".into(),
                "must lie inside",
            ),
            (
                k("k-dotdot"),
                format!("home: {}/../outside\nmounts: []", node.kernels().display()),
                "without . or ..",
            ),
            (
                k("k-rel"),
                "home: relative/home\nmounts: []".into(),
                "absolute",
            ),
            (
                k("k-as-dotdot"),
                format!("mounts: [{{vfolder: {good}, as: '..'}}]"),
                "not allowed",
            ),
            (
                k("k-as-slash"),
                format!("mounts: [{{vfolder: {good}, as: '../../outside/x'}}]"),
                "forbidden character",
            ),
            (
                k("k-as-nul"),
                format!("mounts: [{{vfolder: {good}, as: \"a\\0b\"}}]"),
                "forbidden character",
            ),
            (
                k("k-notuuid"),
                "mounts: [{vfolder: '../../etc'}]".into(),
                "not a uuid",
            ),
            (
                k("k-both"),
                format!("mounts: [{{vfolder: {good}, volume: good, token: read}}]"),
                "exactly one",
            ),
            (
                k("k-unknown"),
                format!("mounts: [{{vfolder: {good}, mode: 0777}}]"),
                "mode",
            ),
            (k("k-uid"), "uid: -1\nmounts: []".into(), "invalid"),
            (
                k("k-dup"),
                format!("mounts: [{{vfolder: {good}}}, {{vfolder: {good}}}]"),
                "two mounts",
            ),
            (
                k("k-token-tmpfs"),
                "mounts: [{volume: good, token: write}]".into(),
                "not an azureblob",
            ),
            (
                k("k-reserved"),
                format!("mounts: [{{vfolder: {good}, as: .vfolderd}}]"),
                "reserved",
            ),
            (
                k("k-reserved-sas"),
                format!("mounts: [{{vfolder: {good}, as: .vfolderd-sas}}]"),
                "reserved",
            ),
            (
                vf(&uuid::Uuid::new_v4().to_string()),
                "{name: .vfolderd, owner: o, volume: good}".into(),
                "reserved",
            ),
            (
                k("k-perm"),
                format!("mounts: [{{vfolder: {id}, permission: sudo}}]"),
                "sudo",
            ),
        ];
        assert!(cases.len() >= 50, "{} cases", cases.len());
        let mut c = etcd.client().await;
        for (key, value, _) in &cases {
            c.put(key.as_str(), value.as_str(), None).await.unwrap();
        }
        // Not UTF-8 at all: raw bytes in the value.
        let mut raw = b"mount: {at: startup, fstype: tmpfs, path: ".to_vec();
        raw.extend([0xff, 0xfe, b'}']);
        c.put(vol("v-nonutf8"), raw, None).await.unwrap();
        cases.push((vol("v-nonutf8"), String::new(), ""));
        // A good kernel converges although every one of those is there.
        etcd.put(&k("k-good"), &format!("mounts: [{{vfolder: {good}}}]\n"))
            .await;
        etcd.wait_state(&node.kernel_status("k-good"), "Ready")
            .await;

        let statuses = etcd.dump(&format!("{P}/status/")).await;
        for (key, _, why) in &cases {
            let after = key.strip_prefix(P).unwrap().trim_start_matches('/');
            let status_key = if let Some(v) = after
                .strip_prefix("volumes/")
                .filter(|v| vfolderd::names::is_valid_object_name(v))
            {
                node.volume_status(v)
            } else if let Some(v) = after
                .strip_prefix("vfolders/")
                .filter(|v| uuid::Uuid::parse_str(v).is_ok())
            {
                format!("{P}/status/vfolders/{v}")
            } else if let Some(v) = after
                .strip_prefix("nodes/n1/kernels/")
                .filter(|v| vfolderd::names::is_valid_object_name(v))
            {
                node.kernel_status(v)
            } else {
                format!(
                    "{P}/status/nodes/n1/rejected/{}",
                    vfolderd::names::escape_key(after)
                )
            };
            let v = statuses
                .iter()
                .find(|(k, _)| *k == status_key)
                .map(|(_, v)| v.clone());
            let v = v.unwrap_or_else(|| panic!("no status for {key} at {status_key}"));
            let json: serde_json::Value = serde_json::from_str(&v).unwrap();
            assert_eq!(json["state"], "Rejected", "{key}: {v}");
            assert!(
                json["error"].as_str().unwrap_or("").contains(why),
                "{key}: the reason should mention {why:?}: {v}"
            );
        }
        let m = node.metrics();
        assert!(
            m.contains("vfolderd_rejected_objects{kind=\"volume\"}"),
            "{m}"
        );
        assert_eq!(
            tree(&outside),
            before_outside,
            "nothing created outside the roots"
        );
        for p in ["/etc/shadow-vfolderd", "/x"] {
            assert!(!Path::new(p).exists());
        }
        let mounts: Vec<_> = node
            .mounts()
            .into_iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        assert_eq!(mounts.len(), 2, "only the good volume and bind: {mounts:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_hot_reload_tightens_loosens_and_survives_an_invalid_file() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        // The policy directory appears after the node started: it is picked up anyway.
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let pdir = node.dir.path().join("policies");
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::create_dir_all(&pdir).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let allow = "fstypes: {tmpfs: {}, bind: {}}\n";
        std::fs::write(pdir.join("10-base.yaml"), allow).unwrap();
        until("the first reload", 20, || {
            node.metric("vfolderd_policy_reloads_total{result=\"ok\"}")
                .is_some()
        })
        .await;

        let id = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/volumes/scratch"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/vfolders/{id}"),
            "{name: data, owner: alice, volume: scratch}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

        // Tighten: tmpfs is no longer allowed. The volume is refused, naming the rule, but stays
        // mounted under k1, and the conflict is reported.
        std::fs::write(pdir.join("10-base.yaml"), "fstypes: {bind: {}}\n").unwrap();
        let st = etcd
            .wait_state(&node.volume_status("scratch"), "Rejected")
            .await;
        assert!(
            st["error"].as_str().unwrap().starts_with("policy fstypes:"),
            "{st}"
        );
        let st = etcd
            .wait_for(&node.volume_status("scratch"), "kept", |v| {
                v.get("kept").is_some()
            })
            .await;
        assert_eq!(st["state"], "Rejected");
        assert!(
            node.mount_at(&node.home("k1").join("data")).is_some(),
            "not torn out from under k1"
        );
        until("the conflict metric", 10, || {
            node.metric("vfolderd_policy_conflicts") == Some(1.0)
        })
        .await;

        // An invalid file is refused; the last good (tight) policy stays.
        let refused = || {
            node.metric("vfolderd_policy_reloads_total{result=\"refused\"}")
                .unwrap_or(0.0)
        };
        let before = refused();
        std::fs::write(
            pdir.join("20-broken.yaml"),
            "fstypes: {tmpfs: {colour: red}}\n",
        )
        .unwrap();
        until("the refusal is counted", 20, || refused() > before).await;
        assert!(node.log().contains("colour"), "the error names the field");
        assert_eq!(
            etcd.get_json(&node.volume_status("scratch")).await.unwrap()["state"],
            "Rejected"
        );
        std::fs::remove_file(pdir.join("20-broken.yaml")).unwrap();

        // Once k1 is gone, the refused volume is unmounted.
        etcd.delete(&node.kernel_key("k1")).await;
        until("the refused volume is unmounted", 20, || {
            node.mount_at(&node.volumes().join("scratch")).is_none()
        })
        .await;

        // Loosen again: the volume is accepted and converges.
        std::fs::write(pdir.join("10-base.yaml"), allow).unwrap();
        etcd.put(
            &node.kernel_key("k2"),
            &format!("mounts: [{{vfolder: {id}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        etcd.wait_state(&node.volume_status("scratch"), "Mounted")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_in_every_input_is_found_nowhere() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    require_private_mount_namespace();
    within(120, async {
        const S: &str = "S3CR3T-MARKER";
        // A pasted account key (88 base64 characters), found nowhere either.
        const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts { helper_double: true, ..Default::default() });
        // As a node's /var/lib would be: other users may traverse it.
        std::fs::set_permissions(node.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let creds = node.dir.path().join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("files"), format!("username=u\npassword={S}-file\n")).unwrap();
        std::fs::set_permissions(creds.join("files"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let inputs = [
            ("inline", format!("mount: {{at: startup, fstype: cifs, path: '//a.file.core.windows.net/s', options: 'username=u,password={S}-inline'}}")),
            ("credfile", "mount: {at: startup, fstype: cifs, path: '//b.file.core.windows.net/s', credentials: files}".to_string()),
            ("unknownfield", format!("mount: {{at: startup, fstype: cifs, path: '//c/s'}}\npassword: {S}-field")),
            ("badenum", format!("mount: {{at: 'password={S}-enum', fstype: cifs, path: '//c/s'}}")),
            ("malformed", format!("mount: {{at: startup, options: 'password={S}-yaml'")),
            ("sasurl", format!("mount: {{at: startup, fstype: azureblob, path: 'https://a.blob.core.windows.net/c?sv=1&sig={S}-sas', credentials: k}}")),
            ("nfspass", format!("mount: {{at: startup, fstype: nfs, path: 'h:/x', options: 'password={S}-nfs'}}")),
            // Issue 12 item 5: a comma in a password (escaped as mount.cifs does), one cut at
            // an unescaped comma, password2=, and a pasted key in a name and in a value.
            ("comma", format!("mount: {{at: startup, fstype: cifs, path: '//d.file.core.windows.net/s', options: 'username=u,password={S}-a,,{S}-comma'}}")),
            ("cut", format!("mount: {{at: startup, fstype: cifs, path: '//e.file.core.windows.net/s', options: 'username=u,password={S}-x,{S}tail'}}")),
            ("pw2", format!("mount: {{at: startup, fstype: cifs, path: '//f.file.core.windows.net/s', options: 'username=u,password={S}-p1,password2={S}-p2'}}")),
            ("keyname", format!("mount: {{at: startup, fstype: azureblob, path: 'https://a.blob.core.windows.net/c', credentials: '{KEY}'}}")),
            ("keyvalue", format!("mount: {{at: '{KEY}', fstype: tmpfs, path: t}}")),
        ];
        for (name, value) in &inputs {
            etcd.put(&format!("{P}/volumes/{name}"), value).await;
        }
        for name in ["inline", "credfile", "comma", "pw2"] {
            etcd.wait_state(&node.volume_status(name), "Mounted").await;
        }
        for name in ["unknownfield", "badenum", "malformed", "sasurl", "nfspass", "cut", "keyname", "keyvalue"] {
            etcd.wait_state(&node.volume_status(name), "Rejected").await;
        }
        let mut found = Vec::new();
        let leaks = |text: &str| text.contains(S) || text.contains(KEY);
        for (k, v) in etcd.dump(&format!("{P}/status/")).await {
            if leaks(&v) {
                found.push(format!("status {k}: {v}"));
            }
        }
        if leaks(&node.log()) {
            found.push("the log".into());
        }
        if leaks(&node.metrics()) {
            found.push("metrics".into());
        }
        let argv = std::fs::read_to_string(node.dir.path().join("helper.log")).unwrap();
        if leaks(&argv) {
            found.push(format!("a child's argv: {argv}"));
        }
        let env = std::fs::read_to_string(node.dir.path().join("helper-env.log")).unwrap();
        if leaks(&env) {
            found.push("a helper's environment".into());
        }
        // Every file under the state directory, read as another local user.
        for f in files_under(&node.dir.path().join("state")) {
            let read = std::process::Command::new("cat")
                .arg(&f)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            if read.status.success() {
                found.push(format!("{} is readable by nobody", f.display()));
            }
        }
        let ls = std::process::Command::new("ls").arg(node.volumes()).uid(65534).gid(65534).output().unwrap();
        if ls.status.success() {
            found.push("the volumes root is listable by nobody".into());
        }
        assert!(found.is_empty(), "the secret leaked into: {found:#?}");
        // And it did reach where it belongs: the helper's 0600 credentials files.
        let seen = std::fs::read_to_string(node.dir.path().join("helper-creds.log")).unwrap();
        for want in [
            format!("{S}-inline"),
            format!("{S}-file"),
            format!("password={S}-a,{S}-comma\n"),
            format!("password2={S}-p2"),
        ] {
            assert!(seen.contains(&want), "{want} in {seen}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_credentials_file_is_used_for_the_next_mount_and_remounts_once_unused() {
    use std::os::unix::fs::PermissionsExt;
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        // A long resync: only the credentials directory's events can notice the rotation.
        let node = Node::start(&etcd, "n1", NodeOpts { helper_double: true, resync: "1h", ..Default::default() });
        let creds = node.dir.path().join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let write = |pw: &str| {
            let tmp = creds.join(".files.new");
            std::fs::write(&tmp, format!("username=u\npassword={pw}\n")).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::rename(&tmp, creds.join("files")).unwrap();
        };
        write("old-one");
        etcd.put(&format!("{P}/volumes/files"), "mount: {at: startup, fstype: cifs, path: '//a.file.core.windows.net/s', credentials: files}\n").await;
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

        write("new-one");
        let st = etcd.wait_for(&node.volume_status("files"), "remount pending", |v| v.get("renewal").is_some()).await;
        assert_eq!(st["state"], "Mounted", "not remounted under k1");
        let calls = || std::fs::read_to_string(node.dir.path().join("helper.log")).unwrap().lines().count();
        assert_eq!(calls(), 1);

        etcd.delete(&node.kernel_key("k1")).await;
        until("remounted with the new credentials", 20, || calls() == 2).await;
        // The helper double logs its argv before the credentials it was given.
        let creds = || std::fs::read_to_string(node.dir.path().join("helper-creds.log")).unwrap();
        until("the helper saw the new credentials", 10, || creds().ends_with("password=new-one\n")).await;

        etcd.wait_for(&node.volume_status("files"), "no renewal pending", |v| v.get("renewal").is_none() && v["state"] == "Mounted").await;
        let on_target = || node.mounts().iter().filter(|m| m.mount_point == node.volumes().join("files")).count();
        until("exactly one mount on the volume target", 10, || on_target() == 1).await;
    })
    .await;
}

/// Issue 12 item 1: sources were matched as strings by globs whose `*`
/// crossed `/`, so each hostile source below passed the shipped policy, and a
/// bind source was followed through symlinks. Now each part of a source is
/// matched by its own glob, paths must be clean, a leading `-` is refused,
/// and a bind source is opened beneath the policy's directory without
/// following a symlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_policy_holds_against_sources_that_walk_around_it() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let d = node.dir.path();
        let policies = d.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.yaml");
        std::fs::copy(shipped, policies.join("default.yaml")).unwrap();
        // The shipped bind rule, moved under this test's directory.
        let allowed = d.join("allowed");
        std::fs::write(
            policies.join("zz-local.yaml"),
            format!(
                "fstypes: {{bind: {{sources: [\"{}/**\"]}}}}\n",
                allowed.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir_all(d.join("secret")).unwrap();
        std::fs::write(d.join("secret/key"), "host secret").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), allowed.join("link")).unwrap();
        write_azurite_key(&node, "k");
        tokio::time::sleep(Duration::from_millis(500)).await; // the policy watcher

        let cases = [
            ("evil-cifs", "cifs", "//evil.example/x.file.core.windows.net/y".to_string(), "", "policy fstypes.cifs.sources"),
            ("dotdot", "bind", format!("{}/../../", allowed.display()), "", "'..'"),
            ("dotdot-etc", "bind", format!("{}/data/../../secret", allowed.display()), "", "'..'"),
            ("evil-blob", "azureblob", "https://acct.blob.evil/c#.blob.core.windows.net/x".into(), "", "fragment"),
            ("lookalike-blob", "azureblob", "https://acct.blob.core.windows.net.evil/c".into(), "", "policy fstypes.azureblob.sources"),
            ("dash-source", "nfs", "-oexec".into(), "", "'-'"),
            ("dash-option", "nfs", "nfs.example:/x".into(), "-fake", "'-'"),
        ];
        for (name, fstype, path, options, _) in &cases {
            let creds = if *fstype == "azureblob" { ", credentials: k" } else { "" };
            etcd.put(
                &format!("{P}/volumes/{name}"),
                &format!("mount: {{at: startup, fstype: {fstype}, path: '{path}', options: '{options}'{creds}}}\n"),
            )
            .await;
        }
        etcd.put(
            &format!("{P}/volumes/link"),
            &format!("mount: {{at: startup, fstype: bind, path: '{}/link'}}\n", allowed.display()),
        )
        .await;
        etcd.put(
            &format!("{P}/volumes/good"),
            &format!("mount: {{at: startup, fstype: bind, path: '{}/data'}}\n", allowed.display()),
        )
        .await;
        // The control: a clean source below the allowed directory mounts.
        etcd.wait_state(&node.volume_status("good"), "Mounted").await;
        for (name, _, _, _, why) in &cases {
            let st = etcd.wait_state(&node.volume_status(name), "Rejected").await;
            assert!(
                st["error"].as_str().unwrap_or("").contains(why),
                "{name}: the reason should mention {why:?}: {st}"
            );
        }
        // The symlink passes the glob but is not followed: Failed, not mounted.
        let st = etcd.wait_state(&node.volume_status("link"), "Failed").await;
        assert!(st["error"].as_str().unwrap_or("").contains("link"), "{st}");
        assert!(!node.volumes().join("link/key").exists(), "the secret directory was bound");
        let mounted: Vec<_> = node.mounts().into_iter().map(|m| m.mount_point).collect();
        assert_eq!(mounted, vec![node.volumes().join("good")], "only the control is mounted");
    })
    .await;
}

/// Limits count across kernels: a kernel refused by `kernels_per_node` runs
/// once an older one goes (no resync in this test). Limits used to turn
/// every event into a whole pass; with the built-in limits always on that
/// would have been every event on every node (seen: `vfolderd_kernel_passes_total`
/// stayed 0 here and in `a_new_kernel_is_a_kernel_pass...`). Now events stay
/// kernel passes, and the kernels whose verdict moved join them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_refused_by_a_limit_runs_once_an_older_one_goes() {
    require_private_mount_namespace();
    within(60, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                resync: "1h",
                ..Default::default()
            },
        );
        let policies = node.dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("limits.yaml"),
            "fstypes: {tmpfs: {}}\nlimits: {kernels_per_node: 1}\n",
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await; // the policy watcher
        etcd.put(&node.kernel_key("k1"), "mounts: []\n").await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.put(&node.kernel_key("k2"), "mounts: []\n").await;
        let st = etcd.wait_state(&node.kernel_status("k2"), "Rejected").await;
        assert!(
            st["error"]
                .as_str()
                .unwrap()
                .contains("policy limits.kernels_per_node"),
            "{st}"
        );
        let kernel_passes = node
            .metric_now("vfolderd_kernel_passes_total")
            .unwrap_or(0.0);
        assert!(
            kernel_passes >= 1.0,
            "events are kernel passes, not whole ones"
        );
        etcd.delete(&node.kernel_key("k1")).await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
    })
    .await;
}
