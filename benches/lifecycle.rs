//! Usage scan and purge, beside the tools an operator would reach for:
//! `du -s --apparent-size` for the scan, `rm -rf` for the purge, each on the
//! same tree (N files in 100 directories) on a tmpfs of its own, in the same
//! run, nothing else running. Files per second; the ratio is vfolderd's
//! rate over the tool's.
//!
//! `unshare --mount --propagation private cargo bench --bench lifecycle -- --files 200000 --samples 3`

use std::path::Path;
use std::time::Instant;

use uuid::Uuid;
use vfolderd::lifecycle::trashfs;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn make_tree(dir: &Path, files: usize) {
    let per = files.div_ceil(100);
    for d in 0..100 {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..per.min(files.saturating_sub(d * per)) {
            std::fs::write(sub.join(format!("f{f}")), b"0123456789").unwrap();
        }
    }
}

fn rate(files: usize, secs: f64) -> f64 {
    files as f64 / secs
}

fn main() {
    let files = arg("--files", 200_000);
    let samples = arg("--samples", 3);
    let root = tempfile::tempdir().unwrap();
    let tmpfs = nix::mount::mount(
        Some("tmpfs"),
        root.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4g"),
    );
    if tmpfs.is_err() {
        eprintln!("not on a tmpfs of its own (run as root under unshare --mount): numbers include the host filesystem");
    }
    let vol = root.path();
    let id = Uuid::from_bytes([0xab; 16]);
    let live = vol.join("ab/ab").join(trashfs::hex(&id));
    println!("{files} files, {samples} samples each, best of each");
    let (mut scan, mut du, mut purge, mut rm) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..samples {
        make_tree(&live, files);
        let t = Instant::now();
        let (n, _) = vfolderd::usage::scan(&live).unwrap();
        scan = scan.min(t.elapsed().as_secs_f64());
        assert_eq!(n as usize, files);
        let t = Instant::now();
        let out = std::process::Command::new("du")
            .args(["-s", "--apparent-size"])
            .arg(&live)
            .output()
            .unwrap();
        du = du.min(t.elapsed().as_secs_f64());
        assert!(out.status.success());

        let t = Instant::now();
        std::process::Command::new("rm")
            .arg("-rf")
            .arg(&live)
            .status()
            .unwrap();
        rm = rm.min(t.elapsed().as_secs_f64());

        make_tree(&live, files);
        let t = Instant::now();
        trashfs::move_to_trash(vol, &live, &id, trashfs::Info::default()).unwrap();
        trashfs::start_purge(vol, &id).unwrap();
        while !trashfs::purge_some(vol, &id, 1000).unwrap().1 {}
        purge = purge.min(t.elapsed().as_secs_f64());
    }
    println!("| measure | vfolderd | reference | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| usage scan, files/s | {:.0} | du -s: {:.0} | {:.2}x |",
        rate(files, scan),
        rate(files, du),
        du / scan
    );
    println!(
        "| purge (batches of 1000), files/s | {:.0} | rm -rf: {:.0} | {:.2}x |",
        rate(files, purge),
        rate(files, rm),
        rm / purge
    );
    let _ = nix::mount::umount2(vol, nix::mount::MntFlags::MNT_DETACH);
}
