//! Benchmarks of the hot pure functions at 10,000 mounts: mountinfo parsing,
//! resolving desired state, and planning (cold node and converged node).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::BTreeSet;
use std::fmt::Write;

use criterion::{criterion_group, criterion_main, Criterion};
use uuid::Uuid;
use vfolderd::keys::Keys;
use vfolderd::policy::Policy;
use vfolderd::reconcile::actual::{parse_mountinfo, MountTable};
use vfolderd::reconcile::plan::{plan, resolve, Action, Actual, NodeView};
use vfolderd::state::desired::{Desired, DesiredParser};
use vfolderd::state::ledger::{MountKind, OwnedMount};

const KERNELS: usize = 2_500;
const VFOLDERS_PER_KERNEL: usize = 4;

fn node() -> NodeView {
    NodeView {
        agent: true,
        storage: false,
        volumes_root: "/v".into(),
        kernels_root: "/k".into(),
        policy: Default::default(),
        identity: Default::default(),
        led: None,
        fenced: false,
    }
}

/// 10 volumes, 10,000 vfolders, 2,500 kernels with 4 vfolders each = 10,000 binds.
fn desired() -> Desired {
    let parser = DesiredParser::with_policy(Keys::new("/p", "n1"), Policy::default(), "/k".into());
    let mut kvs: Vec<(String, String)> = Vec::new();
    for v in 0..10 {
        kvs.push((
            format!("/p/volumes/vol{v}"),
            "mount: {at: requested, fstype: tmpfs, path: t}".into(),
        ));
    }
    for k in 0..KERNELS {
        let mut mounts = String::from("mounts: [");
        for j in 0..VFOLDERS_PER_KERNEL {
            let id = Uuid::from_u128((k * VFOLDERS_PER_KERNEL + j) as u128 + 1);
            kvs.push((
                format!("/p/vfolders/{id}"),
                format!("{{name: f{j}, owner: u{k}, volume: vol{}}}", k % 10),
            ));
            write!(mounts, "{{vfolder: {id}}},").unwrap();
        }
        mounts.push(']');
        kvs.push((format!("/p/nodes/n1/kernels/k{k}"), mounts));
    }
    parser.from_list(kvs.iter().map(|(k, v)| (k.as_str(), v.as_bytes(), 1)), 1)
}

/// The actual state after converging `d`, as the executor would leave it.
fn converged(d: &Desired) -> Actual {
    let want = resolve(&node(), d);
    let mut a = Actual::default();
    let mut mi = String::new();
    for (i, act) in plan(&node(), &want, &a, &BTreeSet::new())
        .into_iter()
        .enumerate()
    {
        let (target, kind, source, volume, kernel) = match act {
            Action::MountVolume { volume } => (
                volume.target,
                MountKind::Volume,
                volume.source,
                volume.name,
                None,
            ),
            Action::Bind { bind } => (
                bind.target,
                MountKind::Bind,
                bind.source.display().to_string(),
                bind.volume,
                Some(bind.kernel),
            ),
            Action::MakeDir { path, .. } => {
                a.dirs.insert(path);
                continue;
            }
            _ => continue,
        };
        writeln!(
            mi,
            "{} 1 0:50 / {} rw,nosuid,nodev,relatime - tmpfs t rw,size=16m",
            100 + i,
            target.display()
        )
        .unwrap();
        std::sync::Arc::make_mut(&mut a.owned_mounts).insert(
            target.clone(),
            OwnedMount {
                target,
                kind,
                source,
                fstype: "tmpfs".into(),
                volume,
                kernel,
                readonly: false,
                expires_at: None,
                credentials_stamp: None,
                helper: None,
                server: None,
                options: None,
                mount_id: None,
            },
        );
    }
    a.mounts = MountTable::new(parse_mountinfo(&mi).unwrap()).into();
    a
}

fn benches(c: &mut Criterion) {
    let d = desired();
    let a = converged(&d);
    let mut mountinfo = String::new();
    for m in a.mounts.iter() {
        writeln!(
            mountinfo,
            "{} 1 0:50 / {} rw,nosuid,nodev,relatime shared:1 - tmpfs t rw,size=16m",
            m.id,
            m.mount_point.display()
        )
        .unwrap();
    }
    assert_eq!(a.mounts.iter().count(), 10 + KERNELS * VFOLDERS_PER_KERNEL);

    c.bench_function("parse_mountinfo/10k_lines", |b| {
        b.iter(|| parse_mountinfo(&mountinfo).unwrap())
    });
    c.bench_function("resolve/2.5k_kernels_10k_vfolders", |b| {
        b.iter(|| resolve(&node(), &d))
    });
    let want = resolve(&node(), &d);
    c.bench_function("plan/10k_binds_cold", |b| {
        b.iter(|| plan(&node(), &want, &Actual::default(), &BTreeSet::new()))
    });
    c.bench_function("plan/10k_binds_converged", |b| {
        b.iter(|| {
            let p = plan(&node(), &want, &a, &BTreeSet::new());
            assert!(p.is_empty(), "{:?}", p.first());
            p
        })
    });
}

criterion_group! {
    name = plan_benches;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(plan_benches);
