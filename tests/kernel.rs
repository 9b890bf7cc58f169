//! Kernels as their users see them: real containers (Debian's `runc`, a
//! busybox root), started the way a platform starts them once the kernel is
//! `Ready` — the home bound at `/home/work` with `rbind,rslave`, the process
//! running as the kernel's uid — doing what a notebook does.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// Busybox applets the scripts use.
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "touch", "mv", "rm", "id", "stat", "echo", "mkdir", "sleep", "df", "dd",
];

/// A container bundle: a busybox root and a runc `config.json`.
struct Container {
    dir: tempfile::TempDir,
    id: String,
    started: bool,
}

impl Container {
    /// A bundle whose process runs `args` as `uid:gid`, with `home` bound at
    /// `/home/work` (`rbind,rslave`, as a platform binds a kernel's home).
    fn new(id: &str, home: &Path, uid: u32, gid: u32, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "tmp", "home/work"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        let spec = Command::new("runc")
            .arg("spec")
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(spec.success(), "runc spec");
        let path = dir.path().join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = args.iter().map(|a| serde_json::json!(a)).collect();
        c["process"]["user"] = serde_json::json!({"uid": uid, "gid": gid});
        c["process"]["cwd"] = "/home/work".into();
        c["root"]["readonly"] = false.into();
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/home/work",
            "type": "bind",
            "source": home,
            "options": ["rbind", "rslave"],
        }));
        std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        Self {
            dir,
            id: format!("{id}-{}", std::process::id()),
            started: false,
        }
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(self.dir.path().join("state"));
        cmd
    }

    /// Starts the process detached (a long-running kernel).
    fn start(&mut self) {
        let status = self
            .runc()
            .args(["run", "--detach", "--bundle"])
            .arg(self.dir.path())
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "runc run --detach");
        self.started = true;
    }

    /// Runs `script` inside the running container as `uid:gid`.
    fn exec(&self, uid: u32, gid: u32, script: &str) -> (i32, String) {
        let out = self
            .runc()
            .args([
                "exec",
                "--user",
                &format!("{uid}:{gid}"),
                &self.id,
                "sh",
                "-c",
                script,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        output(out)
    }

    /// Runs the process to its end: (exit code, stdout + stderr).
    fn run(mut self) -> (i32, String) {
        let out = self
            .runc()
            .args(["run", "--bundle"])
            .arg(self.dir.path())
            .arg(&self.id)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        self.started = true;
        output(out)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.started {
            let _ = self
                .runc()
                .args(["delete", "--force", &self.id])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn output(out: Output) -> (i32, String) {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `script` in a container as `uid:gid` with `home` as `/home/work`.
async fn run_as(home: &Path, uid: u32, gid: u32, script: &str) -> (i32, String) {
    let home = home.to_path_buf();
    let script = script.to_string();
    tokio::task::spawn_blocking(move || {
        Container::new("k", &home, uid, gid, &["sh", "-c", &script]).run()
    })
    .await
    .unwrap()
}

fn vfolder_dir(node: &Node, volume: &str, id: &uuid::Uuid) -> PathBuf {
    node.volumes().join(volume).join(shard(&id.to_string()))
}

/// Issue 13: vfolder directories were created `root:root 0755` and every
/// test wrote as root, so a kernel running as uid 1000 (Backend.AI's `work`
/// user) could not create a file in its own read-write folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_as_uid_1000_uses_its_folders_like_plain_directories() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        etcd.put(&format!("{P}/volumes/shard1"), &tmpfs_volume("requested"))
            .await;
        etcd.put(&format!("{P}/volumes/dataset"), &tmpfs_volume("startup"))
            .await;
        let (rw, ro) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        etcd.put(
            &format!("{P}/vfolders/{rw}"),
            "{name: mine, owner: alice, volume: shard1}\n",
        )
        .await;
        etcd.put(
            &format!("{P}/vfolders/{ro}"),
            "{name: shared, owner: bob, volume: shard1, permission: ro}\n",
        )
        .await;
        etcd.wait_state(&node.volume_status("dataset"), "Mounted").await;
        std::fs::write(node.volumes().join("dataset/README"), "a dataset\n").unwrap();
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {rw}}}, {{vfolder: {ro}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;

        let script = "id -u; \
            echo hello > mine/a.txt && mv mine/a.txt mine/b.txt && cat mine/b.txt && rm mine/b.txt && \
            mkdir mine/results && echo 0.93 > mine/results/acc.txt && echo WROTE; \
            touch shared/x; touch dataset/x; cat dataset/README";
        let (code, out) = run_as(&node.home("k1"), 1000, 1000, script).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.starts_with("1000\n"), "runs as 1000: {out}");
        assert!(out.contains("hello\n") && out.contains("WROTE"), "writes its folder: {out}");
        assert_eq!(
            out.matches("Read-only file system").count(),
            2,
            "EROFS on the ro vfolder and the ro dataset: {out}"
        );
        assert!(out.contains("a dataset"), "reads the dataset: {out}");
        // On the volume the files are the user's.
        let dir = vfolder_dir(&node, "shard1", &rw);
        for p in [dir.clone(), dir.join("results"), dir.join("results/acc.txt")] {
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!((md.uid(), md.gid()), (1000, 1000), "{}", p.display());
        }
        let home = std::fs::metadata(node.home("k1")).unwrap();
        assert_eq!((home.uid(), home.gid()), (1000, 1000), "the home is the user's");
    })
    .await;
}

/// Issue 13: a kernel whose uid differs from its vfolder's volume owner sees
/// the folder through an idmapped bind: the files are its own, and what it
/// writes lands as the volume owner's; nothing is chowned. A volume that
/// cannot be idmapped (cifs here) fails the kernel, naming the fstype.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_as_another_uid_sees_the_folder_as_its_own_through_an_idmapped_bind() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                helper_double: true,
                ..Default::default()
            },
        );
        etcd.put(&format!("{P}/volumes/shard1"), &tmpfs_volume("requested"))
            .await;
        etcd.put(
            &format!("{P}/volumes/smb"),
            "mount: {at: requested, fstype: cifs, path: '//acct.file.core.windows.net/s'}\n",
        )
        .await;
        let (vf, on_smb) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        etcd.put(
            &format!("{P}/vfolders/{vf}"),
            "{name: mine, owner: alice, volume: shard1}\n",
        )
        .await;
        etcd.put(
            &format!("{P}/vfolders/{on_smb}"),
            "{name: smb, owner: alice, volume: smb}\n",
        )
        .await;
        // The owner's kernel (1000) writes a file; another kernel runs as 2000.
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {vf}}}]\n"),
        )
        .await;
        etcd.put(
            &node.kernel_key("k2"),
            &format!("uid: 2000\ngid: 2000\nmounts: [{{vfolder: {vf}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        etcd.wait_state(&node.kernel_status("k2"), "Ready").await;
        let (code, out) = run_as(
            &node.home("k1"),
            1000,
            1000,
            "echo by-1000 > mine/first.txt",
        )
        .await;
        assert_eq!(code, 0, "{out}");

        let script = "id -u; stat -c '%u:%g' mine mine/first.txt; cat mine/first.txt; \
                      echo by-2000 > mine/second.txt && mkdir mine/d && echo WROTE";
        let (code, out) = run_as(&node.home("k2"), 2000, 2000, script).await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(
            out.lines().take(3).collect::<Vec<_>>(),
            ["2000", "2000:2000", "2000:2000"],
            "the folder and its files are the kernel's own: {out}"
        );
        assert!(out.contains("by-1000") && out.contains("WROTE"), "{out}");
        let dir = node.volumes().join("shard1").join(shard(&vf.to_string()));
        for p in ["second.txt", "d", "first.txt"] {
            let md = std::fs::metadata(dir.join(p)).unwrap();
            assert_eq!(
                (md.uid(), md.gid()),
                (1000, 1000),
                "{p} lands as the volume owner's"
            );
        }
        let bind = node
            .mount_at(&node.home("k2").join("mine"))
            .expect("k2's bind");
        assert!(bind.has_option("idmapped"), "{bind:?}");

        // cifs cannot be idmapped: the kernel fails, naming the fstype.
        etcd.put(
            &node.kernel_key("k3"),
            &format!("uid: 2000\ngid: 2000\nmounts: [{{vfolder: {on_smb}}}]\n"),
        )
        .await;
        let st = etcd.wait_state(&node.kernel_status("k3"), "Failed").await;
        assert!(
            st["error"]
                .as_str()
                .unwrap()
                .contains("cifs volumes cannot be idmapped"),
            "{st}"
        );
    })
    .await;
}

/// Issue 13 item 4: a changed volume spec did nothing while the status kept
/// saying `Mounted`. A tmpfs volume's size grows under a running kernel —
/// same mount, same binds, data intact, the new size seen inside the
/// container; a tmpfs option that would need a new mount is not applied and
/// the status says why; a bind volume's new path waits for its kernels
/// (`change: pending`) and is mounted anew once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_spec_changes_apply_in_place_or_wait_for_the_kernels() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        let spec = |opts: &str| {
            format!(
                "mount: {{at: requested, fstype: tmpfs, path: vfolderd-test, options: '{opts}'}}\n"
            )
        };
        etcd.put(&format!("{P}/volumes/shard1"), &spec("size=16m"))
            .await;
        let (a, b) = (
            node.dir.path().join("dataset-a"),
            node.dir.path().join("dataset-b"),
        );
        for (d, text) in [(&a, "version a"), (&b, "version b")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("VERSION"), text).unwrap();
        }
        let dataset = |d: &Path| {
            format!(
                "mount: {{at: startup, fstype: bind, path: '{}'}}\n",
                d.display()
            )
        };
        etcd.put(&format!("{P}/volumes/dataset"), &dataset(&a))
            .await;
        let vf = uuid::Uuid::new_v4();
        etcd.put(
            &format!("{P}/vfolders/{vf}"),
            "{name: mine, owner: alice, volume: shard1}\n",
        )
        .await;
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {vf}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let (code, out) = run_as(&node.home("k1"), 1000, 1000, "echo kept > mine/data.txt").await;
        assert_eq!(code, 0, "{out}");
        let volume = node.volumes().join("shard1");
        let bind = node.home("k1").join("mine");
        let ids = |node: &Node| {
            (
                node.mount_at(&volume).unwrap().id,
                node.mount_at(&bind).unwrap().id,
            )
        };
        let before = ids(&node);
        let size = |p: &Path| {
            let st = nix::sys::statvfs::statvfs(p).unwrap();
            st.blocks() as u64 * st.fragment_size() as u64
        };
        assert_eq!(size(&volume), 16 << 20);

        etcd.put(&format!("{P}/volumes/shard1"), &spec("size=32m"))
            .await;
        until("the volume grows to 32 MiB", 30, || {
            size(&volume) == 32 << 20
        })
        .await;
        assert_eq!(ids(&node), before, "the same mount and the same bind");
        let (code, out) = run_as(
            &node.home("k1"),
            1000,
            1000,
            "cat mine/data.txt; df -k mine",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert!(
            out.starts_with("kept\n") && out.contains("32768"),
            "data kept, new size inside: {out}"
        );
        let m = node.mount_at(&volume).unwrap();
        assert!(m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");

        // A tmpfs option that needs a new mount: not applied, and said so.
        etcd.put(&format!("{P}/volumes/shard1"), &spec("size=32m,mode=0700"))
            .await;
        let st = etcd
            .wait_for(&node.volume_status("shard1"), "change not applied", |v| {
                v.get("change").is_some()
            })
            .await;
        assert_eq!(st["state"], "Mounted");
        assert!(st["change"].as_str().unwrap().contains("\"mode\""), "{st}");
        assert_eq!(ids(&node), before);

        // A bind volume's new path: pending while k1 uses it, applied once k1 is gone.
        etcd.put(&format!("{P}/volumes/dataset"), &dataset(&b))
            .await;
        let st = etcd
            .wait_for(&node.volume_status("dataset"), "change pending", |v| {
                v.get("change").is_some()
            })
            .await;
        assert!(
            st["change"].as_str().unwrap().starts_with("pending"),
            "{st}"
        );
        let version = node.volumes().join("dataset/VERSION");
        assert_eq!(std::fs::read_to_string(&version).unwrap(), "version a");
        etcd.delete(&node.kernel_key("k1")).await;
        until("the dataset is mounted from its new path", 30, || {
            std::fs::read_to_string(&version).ok().as_deref() == Some("version b")
        })
        .await;
        let st = etcd
            .wait_for(&node.volume_status("dataset"), "no change pending", |v| {
                v.get("change").is_none()
            })
            .await;
        assert_eq!(st["state"], "Mounted");
    })
    .await;
}

/// Issue 13 item 3: each home is its own shared mount, so a container that
/// binds it `rbind,rslave` sees what happens to it later, without a restart:
/// a vfolder attached to a running kernel appears inside (hot attach), an
/// external unmount repaired on the host comes back inside, and a detached
/// vfolder is gone inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_sees_hot_attach_repair_and_detach() {
    require_private_mount_namespace();
    within(120, async {
        let etcd = Etcd::start().await;
        let node = Node::start(&etcd, "n1", NodeOpts::default());
        etcd.put(&format!("{P}/volumes/shard1"), &tmpfs_volume("requested"))
            .await;
        let (first, later) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for (id, name) in [(first, "first"), (later, "later")] {
            etcd.put(
                &format!("{P}/vfolders/{id}"),
                &format!("{{name: {name}, owner: alice, volume: shard1}}\n"),
            )
            .await;
        }
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {first}}}]\n"),
        )
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let home = node.home("k1");
        let mut c = Container::new("hot", &home, 1000, 1000, &["sleep", "100000"]);
        tokio::task::block_in_place(|| c.start());
        let inside = |script: &str| tokio::task::block_in_place(|| c.exec(1000, 1000, script));
        let (code, out) = inside("echo one > first/f && ls");
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("later"), "{out}");

        // Hot attach: the running kernel asks for a second vfolder.
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {first}}}, {{vfolder: {later}}}]\n"),
        )
        .await;
        etcd.wait_for(&node.kernel_status("k1"), "Ready with two mounts", |v| {
            v["state"] == "Ready" && v["mounts"].as_array().is_some_and(|m| m.len() == 2)
        })
        .await;
        let (code, out) = inside("echo two > later/g && cat later/g");
        assert_eq!(
            (code, out.as_str()),
            (0, "two\n"),
            "the new vfolder is usable inside"
        );

        // Someone unmounts a bind on the host: repaired, and back inside.
        nix::mount::umount2(&home.join("first"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        until("the bind is repaired on the host", 30, || {
            node.mount_at(&home.join("first")).is_some()
        })
        .await;
        let (code, out) = inside("cat first/f");
        assert_eq!(
            (code, out.as_str()),
            (0, "one\n"),
            "the repaired bind is seen inside"
        );

        // Detach: the kernel no longer asks for `later`.
        etcd.put(
            &node.kernel_key("k1"),
            &format!("mounts: [{{vfolder: {first}}}]\n"),
        )
        .await;
        until("the bind is gone on the host", 30, || {
            node.mount_at(&home.join("later")).is_none()
        })
        .await;
        let (_, out) = inside("cat later/g 2>&1; ls");
        assert!(
            !out.contains("two"),
            "the detached vfolder is gone inside: {out}"
        );
    })
    .await;
}

/// Issue 13: a rw vfolder on a blob volume, written by uid 1000 through
/// rclone from inside a running container; then the rclone server dies and
/// the volume, `heal: always`, is healed under the running kernel — and the
/// container reads its file again without a restart (Kubernetes users wait
/// for a pod restart there: kubernetes/kubernetes#75918).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_vfolder_is_written_as_uid_1000_and_a_killed_rclone_heals_inside_the_container() {
    require_private_mount_namespace();
    within(180, async {
        let etcd = Etcd::start().await;
        let azurite = Azurite::start().await;
        let node = Node::start(
            &etcd,
            "n1",
            NodeOpts {
                extra_config: "probe_interval: 300ms\nprobe_timeout: 2s\n",
                ..Default::default()
            },
        );
        write_azurite_key(&node, "k");
        let spec = format!(
            "mount: {{at: requested, fstype: azureblob, path: {}, credentials: k}}\ncreate: true\nheal: always\n",
            azurite.container_url("userdata")
        );
        etcd.put(&format!("{P}/volumes/userdata"), &spec).await;
        let vf = uuid::Uuid::new_v4();
        etcd.put(&format!("{P}/vfolders/{vf}"), "{name: mine, owner: alice, volume: userdata}\n")
            .await;
        etcd.put(&node.kernel_key("k1"), &format!("mounts: [{{vfolder: {vf}}}]\n"))
            .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let mut c = Container::new("blob", &node.home("k1"), 1000, 1000, &["sleep", "100000"]);
        tokio::task::block_in_place(|| c.start());
        let inside = |script: &str| tokio::task::block_in_place(|| c.exec(1000, 1000, script));
        let (code, out) = inside("id -u && echo results > mine/run1.txt && cat mine/run1.txt");
        assert_eq!((code, out.as_str()), (0, "1000\nresults\n"), "uid 1000 writes through rclone");
        // rclone uploads written files a few seconds later: wait for the blob.
        until("the file reaches the container", 60, || {
            node.cli(&["dataset", "ls", "userdata"]).contains("run1.txt")
        })
        .await;

        let target = node.volumes().join("userdata");
        let (pid, _) = rclone_for(&target).expect("rclone serves the volume");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        until("a new rclone serves the volume", 60, || {
            rclone_for(&target).is_some_and(|(p, _)| p != pid)
        })
        .await;
        etcd.wait_state(&node.kernel_status("k1"), "Ready").await;
        let mut last = String::new();
        until("the file reads again inside the running container", 60, || {
            let (code, out) = inside("cat mine/run1.txt");
            last = out.clone();
            code == 0 && out == "results\n"
        })
        .await;
        assert_eq!(last, "results\n");
    })
    .await;
}
