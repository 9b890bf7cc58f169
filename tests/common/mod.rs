//! Test harness: a real etcd on a free loopback port, the real `vfolderd`
//! binary as a daemon, and helpers to read status keys and the mount table.
//! The suite runs as root in a private mount namespace (scripts/test.sh).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use serde_json::Value;
use vfolderd::reconcile::actual::{parse_mountinfo, MountEntry};

/// Panics unless we are root in a mount namespace of our own: the tests make
/// real mounts and must never touch the host's table.
pub fn require_private_mount_namespace() {
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("read own mount ns");
    let init = std::fs::read_link("/proc/1/ns/mnt").ok();
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root: run scripts/test.sh"
    );
    assert_ne!(
        Some(ours),
        init,
        "end-to-end tests must run in a private mount namespace: run scripts/test.sh"
    );
}

/// A free loopback TCP port, never the same one twice in this process (tests
/// run in parallel: a port handed out but not yet bound must not be reused).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A throwaway etcd server.
pub struct Etcd {
    child: Option<Child>,
    /// Client URL.
    pub endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on a free port and waits until it answers.
    pub async fn start() -> Self {
        // A port can still be taken by another process between probe and bind: retry on new ports.
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = Self::unstarted(free_port());
            match etcd.try_restart().await {
                Ok(()) => return etcd,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// Starts etcd with its client URL on `cport` and waits until it answers.
    pub async fn start_on(cport: u16) -> Self {
        let mut etcd = Self::unstarted(cport);
        etcd.restart().await;
        etcd
    }

    fn unstarted(cport: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("http://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        Etcd {
            child: None,
            endpoint,
            peer,
            dir,
        }
    }

    /// Its data directory (remove it while stopped to wipe etcd).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server (SIGKILL: an outage, not a goodbye). Its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!("etcd did not start: {e}");
        }
    }

    async fn try_restart(&mut self) -> Result<(), String> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &self.endpoint,
                "--advertise-client-urls",
                &self.endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer,
                "--initial-advertise-peer-urls",
                &self.peer,
            ])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd is installed (scripts/install-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(40);
        let log_tail = |dir: &Path| {
            let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        };
        loop {
            if let Ok(mut c) = Client::connect([&self.endpoint], None).await {
                if c.get("probe", None).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}: {}",
                    log_tail(self.dir.path())
                ));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer within 40 s: {}",
                    log_tail(self.dir.path())
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client.
    pub async fn client(&self) -> Client {
        Client::connect([&self.endpoint], None).await.unwrap()
    }

    /// Puts `value` at `key`.
    pub async fn put(&self, key: &str, value: &str) {
        self.client().await.put(key, value, None).await.unwrap();
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) {
        self.client().await.delete(key, None).await.unwrap();
    }

    /// Reads a status value as JSON.
    pub async fn get_json(&self, key: &str) -> Option<Value> {
        let resp = self.client().await.get(key, None).await.unwrap();
        resp.kvs()
            .first()
            .map(|kv| serde_yaml::from_slice(kv.value()).unwrap())
    }

    /// Every key and value under `prefix`.
    pub async fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let resp = self
            .client()
            .await
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_string(),
                    kv.value_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Waits until the value at `key` satisfies `pred`, and returns it.
    pub async fn wait_for(&self, key: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last;
        loop {
            let v = self.get_json(key).await;
            if let Some(v) = &v {
                if pred(v) {
                    return v.clone();
                }
            }
            last = v;
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {key} to be {what}; last value: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `key`'s `state` is `state`.
    pub async fn wait_state(&self, key: &str, state: &str) -> Value {
        self.wait_for(key, state, |v| v["state"] == state).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A 3-member etcd cluster on loopback ports.
pub struct Cluster {
    members: Vec<(String, Option<Child>)>,
    /// Client URLs, one per member.
    pub endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let peers: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect();
        let mut members = Vec::new();
        for i in 0..n {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &clients[i],
                    "--advertise-client-urls",
                    &clients[i],
                ])
                .args([
                    "--listen-peer-urls",
                    &peers[i],
                    "--initial-advertise-peer-urls",
                    &peers[i],
                ])
                .args([
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                ])
                .args(["--initial-cluster-token", "vfolderd-test"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            members.push((clients[i].clone(), Some(child)));
        }
        let c = Cluster {
            members,
            endpoints: clients,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut cl) = Client::connect(&c.endpoints, None).await {
                if cl.put("probe", "1", None).await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "cluster did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client over every member.
    pub async fn client(&self) -> Client {
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3));
        Client::connect(&self.endpoints, Some(opts)).await.unwrap()
    }

    /// Kills the current leader (SIGKILL); returns its client URL.
    pub async fn kill_leader(&mut self) -> String {
        for (url, child) in &mut self.members {
            let Some(_) = child else { continue };
            let Ok(mut c) = Client::connect([url.as_str()], None).await else {
                continue;
            };
            let Ok(st) = c.status().await else { continue };
            if st.header().map(|h| h.member_id()) == Some(st.leader()) {
                let mut ch = child.take().unwrap();
                let _ = ch.kill();
                let _ = ch.wait();
                return url.clone();
            }
        }
        panic!("no leader found");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.members {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The Azurite emulator's published development account and key (not a secret).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// See [`AZURITE_ACCOUNT`].
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A throwaway Azurite blob service on a free loopback port.
pub struct Azurite {
    child: Child,
    /// `http://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts azurite-blob and waits until it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("azurite.log")).unwrap();
        let child = Command::new("azurite-blob")
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--location",
            ])
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("azurite is installed (scripts/install-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "azurite did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Azurite {
            child,
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            _dir: dir,
        }
    }

    /// The URL of `container`, as a blob volume's `path`.
    pub fn container_url(&self, container: &str) -> String {
        format!("{}/{container}", self.endpoint)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the Azurite key as node-local credential `name` (0600).
pub fn write_azurite_key(node: &Node, name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let dir = node.dir.path().join("credentials");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), format!("{AZURITE_KEY}\n")).unwrap();
    std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A TCP proxy in front of etcd that a test can cut, to make etcd
/// unreachable for one daemon while the test keeps writing to etcd directly.
pub struct Proxy {
    /// `http://127.0.0.1:PORT` to give the daemon.
    pub endpoint: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, stalled2, conns2) = (cut.clone(), stalled.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if cut2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let (up, stalled) = (upstream.clone(), stalled2.clone());
                let h = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(&up).await {
                        forward(inbound, outbound, stalled).await;
                    }
                });
                conns2.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy {
            endpoint,
            cut,
            stalled,
            conns,
            accept,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds back etcd's answers (`true`) or lets them through (`false`),
    /// keeping every connection alive: answers are late, not lost.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies both ways. While `stalled`, etcd's HTTP/2 frames are held back,
/// in order, except its PINGs: the connection stays alive (the client's
/// HTTP/2 keep-alive gets its answers) while every answer is late, as
/// behind an etcd or a proxy under load.
async fn forward(
    inbound: tokio::net::TcpStream,
    outbound: tokio::net::TcpStream,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PING: u8 = 6;
    let (mut client_r, mut client_w) = inbound.into_split();
    let (mut etcd_r, mut etcd_w) = outbound.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_r, &mut etcd_w).await;
        let _ = etcd_w.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new(); // bytes not yet a whole frame
        let mut held: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut first = true; // etcd's SETTINGS: never held (a PING must not pass it)
        loop {
            if !stalled.load(std::sync::atomic::Ordering::SeqCst) {
                while let Some(frame) = held.pop_front() {
                    if client_w.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            }
            let read = tokio::time::timeout(Duration::from_millis(20), etcd_r.read(&mut buf));
            let n = match read.await {
                Err(_) => continue, // look at the stall again
                Ok(Ok(n @ 1..)) => n,
                Ok(_) => break,
            };
            pending.extend_from_slice(&buf[..n]);
            // Whole frames: a 9-byte header (24-bit length, type, flags, stream).
            while pending.len() >= 9 {
                let len = (usize::from(pending[0]) << 16)
                    | (usize::from(pending[1]) << 8)
                    | usize::from(pending[2]);
                if pending.len() < 9 + len {
                    break;
                }
                let frame: Vec<u8> = pending.drain(..9 + len).collect();
                // Behind held frames a frame waits its turn (order is
                // meaning), PINGs apart.
                let stall = stalled.load(std::sync::atomic::Ordering::SeqCst) || !held.is_empty();
                if stall && !first && frame[3] != PING {
                    held.push_back(frame);
                } else if client_w.write_all(&frame).await.is_err() {
                    return;
                }
                first = false;
            }
        }
        // Late, not lost: what was held goes before the end.
        while let Some(frame) = held.pop_front() {
            if client_w.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = client_w.write_all(&pending).await;
        let _ = client_w.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// One vfolderd daemon with its own roots under a temp directory.
pub struct Node {
    /// Node name.
    pub name: String,
    /// Temp directory holding roots, state and config.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// `/metrics` address.
    pub listen: String,
    child: Option<Child>,
    own_namespace: bool,
    run_args: &'static [&'static str],
    /// The vfolderd binary `spawn` runs.
    pub binary: PathBuf,
}

/// Options of a test node.
pub struct NodeOpts {
    /// Roles, e.g. `[agent, storage]`.
    pub roles: &'static str,
    /// Resync period.
    pub resync: &'static str,
    /// Linger.
    pub linger: &'static str,
    /// Use the mount-helper test double (for cifs/nfs, which this kernel lacks).
    pub helper_double: bool,
    /// Mount helper timeout.
    pub mount_timeout: &'static str,
    /// Extra config lines.
    pub extra_config: &'static str,
    /// Run the daemon in a mount namespace of its own (as on its own host):
    /// what it mounts is not seen here, only what it writes to shared directories.
    pub own_namespace: bool,
    /// Extra arguments after `run --config F` (e.g. `--log-format json`).
    pub run_args: &'static [&'static str],
    /// Another vfolderd binary than this build's (the previous release).
    pub binary: Option<&'static Path>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        Self {
            roles: "[agent, storage]",
            resync: "1s",
            linger: "0s",
            helper_double: false,
            mount_timeout: "10s",
            extra_config: "",
            own_namespace: false,
            run_args: &[],
            binary: None,
        }
    }
}

/// A mount(8) stand-in for fstypes this kernel has no client for. It logs its
/// argv (one call per line) and the mode and content of any `credentials=`
/// file, sleeps for the seconds in `helper-sleep` (if present), fails while
/// `helper-fail` exists, does nothing more for a `remount`, serves `shares/fuse` through a real `rclone mount`
/// FUSE daemon while `helper-fuse` exists, and otherwise
/// bind-mounts a local directory standing in for the share at the target.
const HELPER_DOUBLE: &str = r#"#!/bin/sh
dir=__DIR__
# Its argv as the kernel shows it to every user, not as the shell parsed it.
tr '\0' ' ' < /proc/$$/cmdline | sed 's/ $//' | cut -d' ' -f3- >> "$dir/helper.log"
while [ $# -gt 1 ]; do
  case "$1" in
    -t) t=$2; shift 2 ;;
    -o) o=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
src=$1; tgt=$2
creds=$(printf '%s' "$o" | tr ',' '\n' | sed -n 's/^credentials=//p')
if [ -n "$creds" ]; then
  { stat -c '%a' "$creds"; cat "$creds"; } >> "$dir/helper-creds.log"
fi
# Its environment, for the secret scanner (secrets travel in files, never here).
env >> "$dir/helper-env.log"
[ -f "$dir/helper-sleep" ] && sleep "$(cat "$dir/helper-sleep")"
if [ -f "$dir/helper-fail" ]; then echo "mount error(112): Host is down" >&2; exit 32; fi
# A remount changes options of the mount that is there: nothing to bind.
case ",$o," in *,remount,*) exit 0 ;; esac
if [ -f "$dir/helper-fuse" ]; then
  mkdir -p "$dir/shares/fuse"
  exec rclone mount "$dir/shares/fuse" "$tgt" --daemon --log-file "$dir/rclone.log"
fi
share="$dir/shares/$(printf '%s' "$src" | tr -c 'A-Za-z0-9.\n' '_')"
mkdir -p "$share"
exec mount --bind "$share" "$tgt"
"#;

/// The directory the helper double uses as the share for `source`.
pub fn share_dir(node_dir: &Path, source: &str) -> PathBuf {
    let name: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    node_dir.join("shares").join(name)
}

/// The key prefix every test uses.
pub const P: &str = "/vfolderd";

impl Node {
    /// Writes a config and starts the daemon.
    pub fn start(etcd: &Etcd, name: &str, opts: NodeOpts) -> Self {
        Self::start_with_endpoint(&etcd.endpoint, name, opts)
    }

    /// Like [`Node::start`], for an etcd endpoint that may not answer yet.
    pub fn start_with_endpoint(endpoint: &str, name: &str, opts: NodeOpts) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vfolderd-e2e")
            .tempdir()
            .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let d = dir.path().display();
        let helper = dir.path().join("mount-helper");
        if opts.helper_double {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&helper, HELPER_DOUBLE.replace("__DIR__", &d.to_string())).unwrap();
            std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut helper_line = if opts.helper_double {
            format!("mount_helper: {}\n", helper.display())
        } else {
            String::new()
        };
        // scripts/test.sh runs the daemon tests once more with the fallback
        // forced (a key the previous release does not know).
        if let (Ok(mode), None) = (std::env::var("VFOLDERD_TEST_MOUNT_TABLE"), opts.binary) {
            helper_line.push_str(&format!("mount_table: {mode}\n"));
        }
        let cfg = format!(
            "node: {name}\nroles: {}\netcd: {{endpoints: [\"{}\"], prefix: {P}}}\nroots: {{volumes: {d}/volumes, kernels: {d}/kernels}}\n\
             state: {d}/state\ncredentials: {d}/credentials\npolicies: {d}/policies\nlisten: {listen}\nresync: {}\nlinger: {}\n\
             mount_timeout: {}\n{helper_line}{}",
            opts.roles, endpoint, opts.resync, opts.linger, opts.mount_timeout, opts.extra_config
        );
        let config = dir.path().join("node.yaml");
        std::fs::write(&config, cfg).unwrap();
        let mut n = Node {
            name: name.into(),
            dir,
            config,
            listen,
            child: None,
            own_namespace: opts.own_namespace,
            run_args: opts.run_args,
            binary: opts.binary.map_or_else(
                || PathBuf::from(env!("CARGO_BIN_EXE_vfolderd")),
                Path::to_path_buf,
            ),
        };
        n.spawn();
        n
    }

    /// (Re)starts the daemon process.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vfolderd.log"))
            .unwrap();
        let mut cmd = if self.own_namespace {
            // unshare execs the daemon (no fork): the child is the daemon.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--"])
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            .args(self.run_args)
            .env("RUST_LOG", "info,vfolderd=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Whether the daemon process is still running (not exited or crashed).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vfolderd.log")).unwrap_or_default()
    }

    /// Volumes root.
    pub fn volumes(&self) -> PathBuf {
        self.dir.path().join("volumes")
    }
    /// Kernels root.
    pub fn kernels(&self) -> PathBuf {
        self.dir.path().join("kernels")
    }
    /// Default home of kernel `id`.
    pub fn home(&self, id: &str) -> PathBuf {
        self.kernels().join(id).join("work")
    }

    /// Runs a CLI subcommand with this node's config; returns its whole output.
    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let pos = if full.first().map(String::as_str) == Some("vfolder")
            || full.first().map(String::as_str) == Some("dataset")
        {
            2
        } else {
            1
        };
        full.insert(pos, "--config".into());
        full.insert(pos + 1, self.config.display().to_string());
        Command::new(env!("CARGO_BIN_EXE_vfolderd"))
            .args(&full)
            .output()
            .unwrap()
    }

    /// Runs a CLI subcommand with this node's config; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "vfolderd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Volume status key.
    pub fn volume_status(&self, v: &str) -> String {
        format!("{P}/status/nodes/{}/volumes/{v}", self.name)
    }
    /// Kernel status key.
    pub fn kernel_status(&self, k: &str) -> String {
        format!("{P}/status/nodes/{}/kernels/{k}", self.name)
    }
    /// Kernel desired key.
    pub fn kernel_key(&self, k: &str) -> String {
        format!("{P}/nodes/{}/kernels/{k}", self.name)
    }

    /// vfolderd's volume mounts and binds under this node's roots, from the
    /// real mount table. The structure it also mounts is left out: the
    /// kernels root's private bind of itself and each home's shared bind of
    /// itself ([`Node::structure_mounts`]).
    pub fn mounts(&self) -> Vec<MountEntry> {
        let kernels = self.kernels();
        mounts_under(self.dir.path())
            .into_iter()
            .filter(|m| !is_structure(m, &kernels))
            .collect()
    }

    /// The kernels root's bind of itself and the homes' binds of themselves.
    pub fn structure_mounts(&self) -> Vec<MountEntry> {
        let kernels = self.kernels();
        mounts_under(self.dir.path())
            .into_iter()
            .filter(|m| is_structure(m, &kernels))
            .collect()
    }

    /// The visible mount at `target`.
    pub fn mount_at(&self, target: &Path) -> Option<MountEntry> {
        self.mounts().into_iter().rfind(|m| m.mount_point == target)
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> String {
        http_get(&self.listen, "/metrics").1
    }

    /// Like [`Node::metric`], but `None` instead of waiting while the endpoint is not up.
    pub fn metric_now(&self, series: &str) -> Option<f64> {
        let mut s = TcpStream::connect(&self.listen).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
    }

    /// The value of one series (exact label text, e.g. `vfolderd_kernels{state="Ready"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // A failed test shows what the daemon said last.
            let log = std::fs::read_to_string(self.dir.path().join("vfolderd.log"));
            let log = log.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let name = self.dir.path().display();
            eprintln!("--- last lines of {name}/vfolderd.log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        // FUSE daemons the helper double started for this node go with it.
        let me = self.dir.path().to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = String::from_utf8_lossy(
                &std::fs::read(e.path().join("cmdline")).unwrap_or_default(),
            )
            .replace('\0', " ");
            if cmd.contains("rclone") && cmd.contains(&me) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Clean our namespace's mounts so the temp dir can be removed.
        let mut ms = mounts_under(self.dir.path());
        ms.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
        for m in ms {
            let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A bind of a directory under the kernels root onto itself (the root's
/// private mount, a home's shared one): its root, the path inside its
/// filesystem, is the tail of its own mount point (`/tmp` may be a
/// filesystem of its own, as in the fresh-machine root). A bind of a
/// volume's directory ends elsewhere, and one of a volume's root is `/`.
fn is_structure(m: &MountEntry, kernels: &Path) -> bool {
    let tail = m.root.strip_prefix("/").unwrap_or(&m.root);
    m.mount_point.starts_with(kernels)
        && !tail.as_os_str().is_empty()
        && m.mount_point.ends_with(tail)
}

/// Mounts whose mount point lies under `dir`, in mountinfo order.
pub fn mounts_under(dir: &Path) -> Vec<MountEntry> {
    let text = std::fs::read("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A tmpfs volume spec.
pub fn tmpfs_volume(at: &str) -> String {
    format!("mount: {{at: {at}, fstype: tmpfs, path: vfolderd-test, options: 'size=16m'}}\n")
}

/// Polls `f` every 25 ms until it holds; fails the test after `secs`.
pub async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A vfolder's directory below its volume: `<hex[0:2]>/<hex[2:4]>/<hex>`.
pub fn shard(id: &str) -> String {
    let hex = id.replace('-', "");
    format!("{}/{}/{hex}", &hex[0..2], &hex[2..4])
}

/// The FUSE daemon (rclone) serving `target`: its pid and command line.
pub fn rclone_for(target: &Path) -> Option<(i32, String)> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmd.contains("rclone") && cmd.contains(target.to_str()?) {
            return Some((pid, cmd));
        }
    }
    None
}

/// Every running process that serves `target` with rclone (a zombie has no
/// command line, so it is not counted).
pub fn rclones_for(target: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmd.contains("rclone") && cmd.contains(&*target.to_string_lossy()) {
            out.push(pid);
        }
    }
    out
}

/// Runs an async test body with a deadline, so a deadlock fails instead of hanging CI.
pub async fn within<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out: likely deadlocked");
}

/// A process stopped with SIGSTOP (a FUSE daemon frozen, as a hard NFS
/// mount whose server is gone would be); resumed when dropped, so a failing
/// test never leaves it frozen under the rest of the suite.
pub struct Frozen(nix::unistd::Pid);

impl Frozen {
    /// Stops `pid`.
    pub fn stop(pid: i32) -> Self {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A tmpfs volume `data`, a vfolder `mine` on it, and kernel `k` using it,
/// Ready. Returns the vfolder's id.
pub async fn ready_kernel_with_a_folder(etcd: &Etcd, node: &Node, k: &str) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    etcd.put(&format!("{P}/volumes/data"), &tmpfs_volume("requested"))
        .await;
    etcd.put(
        &format!("{P}/vfolders/{id}"),
        "{name: mine, owner: alice, volume: data}",
    )
    .await;
    etcd.put(
        &node.kernel_key(k),
        &format!("mounts: [{{vfolder: {id}}}]\n"),
    )
    .await;
    etcd.wait_state(&node.kernel_status(k), "Ready").await;
    id
}
