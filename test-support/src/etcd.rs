//! A real etcd (Debian `etcd-server`) on a free port with a temporary data dir.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{find_program, require, wait_for};

/// A running etcd; stopped (by its own PID) and its data dir removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Address etcd listens on for clients and peers.
    ip: String,
    client_port: u16,
    peer_port: u16,
    /// Network namespace to run in (None = the test's own namespace).
    netns: Option<String>,
    starts: u32,
    tls: Option<TlsFiles>,
}

/// PEM files for a TLS etcd: a CA, a server certificate for 127.0.0.1, a client certificate.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Whether etcd demands client certificates.
    pub client_cert_auth: bool,
}

impl TlsFiles {
    /// Makes a throwaway CA and certificates with the openssl command in `dir`.
    pub fn generate(dir: &Path, client_cert_auth: bool) -> Result<TlsFiles, String> {
        let p = |n: &str| dir.join(n);
        let s = |x: &Path| x.to_string_lossy().into_owned();
        let ossl = |args: &[&str]| crate::sh("openssl", args).map(|_| ());
        std::fs::write(
            p("ext.cnf"),
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .map_err(|e| e.to_string())?;
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=flannel-test-ca",
            "-keyout",
            &s(&p("ca.key")),
            "-out",
            &s(&p("ca.pem")),
        ])?;
        for name in ["server", "client"] {
            ossl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &s(&p(&format!("{name}.key"))),
                "-out",
                &s(&p(&format!("{name}.csr"))),
            ])?;
            ossl(&[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &s(&p(&format!("{name}.csr"))),
                "-CA",
                &s(&p("ca.pem")),
                "-CAkey",
                &s(&p("ca.key")),
                "-CAcreateserial",
                "-extfile",
                &s(&p("ext.cnf")),
                "-out",
                &s(&p(&format!("{name}.pem"))),
            ])?;
        }
        Ok(TlsFiles {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            client_cert_auth,
        })
    }
}

impl Etcd {
    /// Starts etcd on 127.0.0.1 (free ports). Returns None (after printing why) when etcd is
    /// not installed and CI is not set; panics under CI.
    pub fn start() -> Option<Etcd> {
        if !require(
            find_program("etcd").is_some(),
            "needs etcd (Debian package etcd-server)",
        ) {
            return None;
        }
        let mut e = Etcd::new("127.0.0.1", crate::free_port(), crate::free_port(), None);
        e.spawn();
        Some(e)
    }

    /// Starts etcd on the IPv6 loopback `::1` (free ports; endpoints `http://[::1]:PORT`).
    /// None = skip (see start).
    pub fn start_ipv6() -> Option<Etcd> {
        if !require(
            find_program("etcd").is_some(),
            "needs etcd (Debian package etcd-server)",
        ) {
            return None;
        }
        let mut e = Etcd::new("::1", crate::free_port(), crate::free_port(), None);
        e.spawn();
        Some(e)
    }

    /// Starts etcd on 127.0.0.1 serving clients over TLS with `tls`. None = skip (see start).
    pub fn start_tls(tls: TlsFiles) -> Option<Etcd> {
        if !require(
            find_program("etcd").is_some(),
            "needs etcd (Debian package etcd-server)",
        ) {
            return None;
        }
        let mut e = Etcd::new("127.0.0.1", crate::free_port(), crate::free_port(), None);
        e.tls = Some(tls);
        e.spawn();
        Some(e)
    }

    /// Starts etcd inside a network namespace, listening on `ip` and loopback.
    pub fn start_in_netns(netns: &str, ip: &str) -> Etcd {
        let mut e = Etcd::new(ip, 2379, 2380, Some(netns.to_string()));
        e.spawn();
        e
    }

    fn new(ip: &str, client_port: u16, peer_port: u16, netns: Option<String>) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("flannel-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temp dir for etcd: {e}"));
        Etcd {
            child: None,
            dir,
            ip: ip.to_string(),
            client_port,
            peer_port,
            netns,
            starts: 0,
            tls: None,
        }
    }

    /// The address as a URL host (IPv6 in brackets).
    fn host(&self) -> String {
        if self.ip.contains(':') {
            format!("[{}]", self.ip)
        } else {
            self.ip.clone()
        }
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host(), self.client_port)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log =
            File::create(self.log_path()).unwrap_or_else(|e| panic!("creating the etcd log: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cloning the etcd log handle: {e}"));
        let peer = format!("http://{}:{}", self.host(), self.peer_port);
        let mut clients = self.endpoint();
        if self.ip != "127.0.0.1" && self.ip != "::1" {
            clients += &format!(",http://127.0.0.1:{}", self.client_port);
        }
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &t.server_cert),
                ("--key-file", &t.server_key),
            ] {
                tls_args.push(flag.into());
                tls_args.push(path.to_string_lossy().into_owned());
            }
            if t.client_cert_auth {
                tls_args.push("--client-cert-auth".into());
                tls_args.push("--trusted-ca-file".into());
                tls_args.push(t.ca.to_string_lossy().into_owned());
            }
        }
        let child = self
            .command("etcd")
            .args(&tls_args)
            .args([
                "--name",
                "default",
                "--data-dir",
                &self.dir.path().join("data").to_string_lossy(),
                "--listen-client-urls",
                &clients,
                "--advertise-client-urls",
                &self.endpoint(),
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("default={peer}"),
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        self.child = Some(child);
        if !self.wait_healthy(Duration::from_secs(20)) {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            self.stop();
            panic!(
                "etcd did not become healthy within 20 s; its log:\n{}",
                tail(&log, 30)
            );
        }
    }

    fn wait_healthy(&mut self, limit: Duration) -> bool {
        let endpoint = self.endpoint();
        wait_for(limit, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false); // exited
                }
            }
            let ok = self
                .etcdctl(&["--endpoints", &endpoint, "endpoint", "health"])
                .is_ok();
            ok.then_some(true)
        })
        .unwrap_or(false)
    }

    /// Runs etcdctl (v3 API) against this etcd, in its namespace, bounded to 10 s.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let endpoint = self.endpoint();
        let mut cmd = self.command("etcdctl");
        if !args.contains(&"--endpoints") {
            cmd.args(["--endpoints", &endpoint]);
        }
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()));
            cmd.arg(format!("--cert={}", t.client_cert.display()));
            cmd.arg(format!("--key={}", t.client_key.display()));
        }
        cmd.args(["--command-timeout", "5s"])
            .args(args)
            .env("ETCDCTL_API", "3");
        crate::run_checked(&mut cmd, Duration::from_secs(10))
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s). Data is kept for [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::stop_child(&mut child, Duration::from_secs(5));
        }
    }

    /// Starts etcd again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The last lines of etcd's current log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
