//! How fast an external unmount is repaired: the real daemon, a real etcd, a
//! real bind; each sample unmounts the bind from outside and waits (on the
//! mount table's POLLPRI event, not a busy loop) until vfolderd has put it back.
//!
//! Needs root in a private mount namespace:
//! `sudo unshare --mount --propagation private cargo bench --bench repair -- --samples 200`

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vfolderd::reconcile::actual::parse_mountinfo;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mounted(target: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .unwrap()
        .iter()
        .any(|m| m.mount_point == target)
}

/// Blocks until `target` is mounted, woken by mount-table events.
fn wait_mounted(target: &Path, limit: Duration) -> bool {
    let f = std::fs::File::open("/proc/self/mountinfo").unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if mounted(target) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLPRI)];
        let ms = PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap();
        let _ = poll(&mut fds, ms);
        let _ = std::fs::read_to_string("/proc/self/mountinfo"); // re-arm: re-read from offset 0
    }
}

fn etcdctl(endpoint: &str, args: &[&str]) {
    let ok = Command::new("etcdctl")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "etcdctl {args:?}");
}

fn main() {
    let samples: usize = std::env::args()
        .skip_while(|a| a != "--samples")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    if !nix::unistd::geteuid().is_root() || ours == std::fs::read_link("/proc/1/ns/mnt").ok() {
        println!("repair bench skipped: run as root in a private mount namespace:");
        println!("  sudo unshare --mount --propagation private cargo bench --bench repair -- --samples {samples}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cport, pport) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let _etcd = Kill(
        Command::new("etcd")
            .args(["--name", "b", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("b={peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd installed (scripts/install-deps.sh)"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Command::new("etcdctl")
        .arg(format!("--endpoints={endpoint}"))
        .args(["endpoint", "health"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "node: bench\nroles: [agent, storage]\netcd: {{endpoints: [\"{endpoint}\"], prefix: /vfolderd}}\n\
         roots: {{volumes: {0}/volumes, kernels: {0}/kernels}}\nstate: {0}/state\nlisten: {listen}\nresync: 1h\n",
        d.display()
    );
    std::fs::write(d.join("node.yaml"), cfg).unwrap();
    let _daemon = Kill(
        Command::new(env!("CARGO_BIN_EXE_vfolderd"))
            .args(["run", "--config"])
            .arg(d.join("node.yaml"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let id = uuid::Uuid::new_v4();
    etcdctl(
        &endpoint,
        &[
            "put",
            "/vfolderd/volumes/v",
            "mount: {at: requested, fstype: tmpfs, path: v}",
        ],
    );
    etcdctl(
        &endpoint,
        &[
            "put",
            &format!("/vfolderd/vfolders/{id}"),
            "{name: data, owner: o, volume: v}",
        ],
    );
    etcdctl(
        &endpoint,
        &[
            "put",
            "/vfolderd/nodes/bench/kernels/k",
            &format!("mounts: [{{vfolder: {id}}}]"),
        ],
    );
    let target: PathBuf = d.join("kernels/k/work/data");
    assert!(
        wait_mounted(&target, Duration::from_secs(30)),
        "the bind never appeared"
    );
    std::thread::sleep(Duration::from_millis(500));

    let mut lat: Vec<Duration> = Vec::with_capacity(samples);
    for _ in 0..samples {
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        let t0 = Instant::now();
        assert!(
            wait_mounted(&target, Duration::from_secs(10)),
            "not repaired within 10 s"
        );
        lat.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20)); // let the follow-up pass settle
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    println!(
        "external unmount -> repaired ({} samples, resync 1h: event-driven only)",
        lat.len()
    );
    println!("| p50 | p90 | p99 | max | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | p99 < 100 ms: {} |",
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99)),
        ms(lat[lat.len() - 1]),
        if pct(0.99) < Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
}
