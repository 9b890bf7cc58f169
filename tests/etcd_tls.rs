//! vfolderd against an etcd with TLS, client-certificate checks and
//! user/password auth enabled; the certificates are made by the test.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sh(dir: &Path, cmd: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "{cmd}");
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate for `root`.
fn make_certs(dir: &Path) {
    sh(dir, "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=vfolderd-test-ca");
    for (name, cn, ext) in [
        (
            "server",
            "etcd",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "root", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        sh(dir, &format!("openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={cn}"));
        sh(dir, &format!("openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 1 -extfile {name}.ext"));
    }
    sh(dir, "chmod 600 *.key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfolderd_works_with_etcd_tls_client_certs_and_password_auth_and_fails_static_in_an_outage()
{
    require_private_mount_namespace();
    within(120, async {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make_certs(dir);
        let (cport, pport) = (free_port(), free_port());
        let endpoint = format!("https://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        let mut etcd = Command::new("etcd")
            .args(["--name", "tls", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer, "--initial-cluster", &format!("tls={peer}")])
            .args(["--cert-file", "server.pem", "--key-file", "server.key", "--client-cert-auth", "--trusted-ca-file", "ca.pem"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .unwrap();
        let etcdctl = |args: &str| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("etcdctl --endpoints={endpoint} --cacert ca.pem --cert client.pem --key client.key {args}"))
                .current_dir(dir)
                .env("ETCDCTL_API", "3")
                .output()
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !etcdctl("endpoint health").status.success() {
            assert!(Instant::now() < deadline, "TLS etcd did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(etcdctl("user add root --new-user-password=rootpw").status.success());
        assert!(etcdctl("auth enable").status.success());
        assert!(etcdctl(&format!("put {P}/volumes/secure '{}'", tmpfs_volume("startup").trim())).status.success());
        // Plain http is refused by this etcd.
        assert!(!Command::new("etcdctl").arg(format!("--endpoints=http://127.0.0.1:{cport}")).arg("get").arg("x").output().unwrap().status.success());

        let node = Node::start_with_endpoint(&endpoint, "n1", NodeOpts::default());
        let pw = node.dir.path().join("etcd-password");
        std::fs::write(&pw, "rootpw\n").unwrap();
        sh(node.dir.path(), "chmod 600 etcd-password");
        let mut cfg = std::fs::read_to_string(&node.config).unwrap();
        cfg = cfg.replacen(
            &format!("prefix: {P}}}"),
            &format!(
                "prefix: {P}, tls: {{ca: {0}/ca.pem, cert: {0}/client.pem, key: {0}/client.key}}, user: root, password_file: {1}}}",
                dir.display(),
                pw.display()
            ),
            1,
        );
        std::fs::write(&node.config, cfg).unwrap();
        // Restart with TLS and auth configured (the first start had neither and could not connect).
        let mut node = node;
        let _ = node.stop();
        node.spawn();

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = etcdctl(&format!("get --print-value-only {P}/status/nodes/n1/volumes/secure"));
            if String::from_utf8_lossy(&out.stdout).contains("\"Mounted\"") {
                break;
            }
            assert!(Instant::now() < deadline, "never Mounted over TLS+auth:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(node.mount_at(&node.volumes().join("secure")).is_some());

        // Issue 11 item 11: with a user configured, connecting authenticates
        // eagerly, and a node restarted during an etcd outage served nothing
        // and repaired nothing. Now the stored state is served at once.
        let put = etcdctl(&format!("put {} 'mounts: []'", node.kernel_key("k1")));
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let bind = node.home("k1").join("secure");
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.mount_at(&bind).is_none() {
            assert!(Instant::now() < deadline, "k1 never got the dataset:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(node.stop());
        let _ = etcd.kill();
        let _ = etcd.wait();
        nix::mount::umount2(&bind, nix::mount::MntFlags::MNT_DETACH).unwrap();
        node.spawn();
        until("/healthz answers during the outage", 20, || {
            http_get(&node.listen, "/healthz").0 == 200
        })
        .await;
        until("k1's lost bind is repaired from the stored state", 30, || {
            node.mount_at(&bind).is_some()
        })
        .await;
        until("the log says the stored state is served", 20, || {
            node.log().contains("serving the stored desired state")
        })
        .await;
        assert!(!node.log().contains("rootpw"), "the etcd password is not logged");
    })
    .await;
}
