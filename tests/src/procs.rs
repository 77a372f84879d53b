//! Private server processes for tests that stop and restart a dependency (so they never
//! disturb the shared services other tests use), and the built `bulwark` binary (started as a
//! server by [`crate::process`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Send SIGTERM.
    pub fn term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
    /// Send `signal` (a name `kill` knows: `STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }
    /// Wait for exit up to `timeout`; the exit code if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Wait until something accepts TCP connections on loopback `port`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A private Redis on `port`; `None` when redis-server is not installed (and not required).
pub fn start_redis(port: u16) -> Option<Proc> {
    if !have("redis-server") {
        assert!(
            !crate::services::require_services(),
            "redis-server not installed"
        );
        return None;
    }
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    assert!(
        wait_port(port, Duration::from_secs(10)),
        "redis-server did not listen"
    );
    Some(Proc { child })
}

/// A private NATS with JetStream storing under `dir`; `None` when nats-server is missing.
pub fn start_nats(port: u16, dir: &Path) -> Option<Proc> {
    if !have("nats-server") {
        assert!(
            !crate::services::require_services(),
            "nats-server not installed"
        );
        return None;
    }
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    assert!(
        wait_port(port, Duration::from_secs(10)),
        "nats-server did not listen"
    );
    Some(Proc { child })
}

/// The `bulwark` binary (debug, all features). `scripts/test` builds it before the tests.
pub fn bulwark_binary() -> PathBuf {
    let path = crate::app::binary_path();
    assert!(
        path.exists(),
        "{} missing: run `cargo build -p bulwark` first",
        path.display()
    );
    path
}

/// A private three-master Redis Cluster (no replicas) on free ports; `None` when redis-server
/// is not installed (and not required). The processes die with the returned handles.
pub fn start_redis_cluster(dir: &Path) -> Option<(Vec<Proc>, Vec<u16>)> {
    if !have("redis-server") || !have("redis-cli") {
        assert!(
            !crate::services::require_services(),
            "redis-server not installed"
        );
        return None;
    }
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for p in &ports {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &p.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{p}.conf"),
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        procs.push(Proc { child });
        assert!(
            wait_port(*p, Duration::from_secs(10)),
            "cluster node did not listen"
        );
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli --cluster create");
    assert!(created.success(), "cluster creation failed");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "cluster", "info"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        });
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cluster never reached cluster_state:ok"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((procs, ports))
}

/// A private Redis master watched by one Sentinel (service `mymaster`); returns the processes,
/// the master's port and the sentinel's port.
pub fn start_redis_sentinel(dir: &Path) -> Option<(Vec<Proc>, u16, u16)> {
    let master_port = free_port();
    let master = start_redis(master_port)?;
    let sentinel_port = free_port();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\nsentinel down-after-milliseconds mymaster 5000\n"
        ),
    )
    .expect("sentinel.conf");
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn redis sentinel");
    let sentinel = Proc { child };
    assert!(
        wait_port(sentinel_port, Duration::from_secs(10)),
        "sentinel did not listen"
    );
    Some((vec![master, sentinel], master_port, sentinel_port))
}
