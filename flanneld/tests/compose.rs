//! The compose testbed's check (`deploy/compose/testbed check`), run for real where a Docker
//! engine answers: three etcd members, three node containers, connectivity on vxlan and udp,
//! one etcd member stopped, a node container killed (its lease revoked, the others drop its
//! routes) and started again (same subnet). Needs root and a Docker engine with a compose tool
//! (`deploy/install-deps.sh` installs Debian's docker.io and docker-compose, `.ci/run` starts
//! dockerd): without them it skips with the reason, and under CI it fails like every other test.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{random_tag, require, require_root_with, run_bounded};

fn docker_answers() -> Result<(), String> {
    let info = run_bounded(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(20),
    )?;
    if !info.status.success() {
        return Err(format!(
            "no Docker engine answers: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        ));
    }
    let plugin = run_bounded(
        Command::new("docker").args(["compose", "version"]),
        Duration::from_secs(20),
    )
    .is_ok_and(|o| o.status.success());
    if !plugin && test_support::find_program("docker-compose").is_none() {
        return Err("no compose tool (docker compose or docker-compose)".into());
    }
    Ok(())
}

/// Brings the project down whatever happened (the script's own trap may not have run).
struct Down {
    script: PathBuf,
    project: String,
}

impl Drop for Down {
    fn drop(&mut self) {
        if std::path::Path::new("/run/flannel-compose")
            .join(&self.project)
            .exists()
        {
            let _ = run_bounded(
                Command::new(&self.script).args(["down", &self.project]),
                Duration::from_secs(300),
            );
        }
    }
}

/// Runs `deploy/compose/testbed ARGS` as its own project (removed whatever happens), bounded
/// to 25 minutes (the first run builds the base image); its exit status and output.
fn script(args: &[&str]) -> (std::process::ExitStatus, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/testbed");
    let project = format!("flrstest{}", random_tag(6).to_lowercase());
    let _down = Down {
        script: script.clone(),
        project: project.clone(),
    };
    let log_path = std::env::temp_dir().join(format!("{project}.log"));
    let log = File::create(&log_path).unwrap();
    let mut child = Command::new(&script)
        .args(args)
        .env("FLANNEL_COMPOSE_PROJECT", &project)
        // Built by `cargo test --workspace`: flanneld, flannelctl and flannel side by side.
        .env(
            "FLANNEL_BIN_DIR",
            PathBuf::from(env!("CARGO_BIN_EXE_flanneld"))
                .parent()
                .unwrap(),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1500);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            // SIGTERM: the script's trap removes the project; Down does it otherwise.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    println!("{out}");
    let status =
        status.unwrap_or_else(|| panic!("testbed {args:?} did not finish in 25 minutes:\n{out}"));
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=com.docker.compose.project={project}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "containers of {project} left"
    );
    (status, out)
}

#[test]
fn compose_testbed_survives_member_and_node_loss() {
    if !require_root_with(&["jq"]) {
        return;
    }
    if !require(
        test_support::find_program("docker").is_some(),
        "no docker command here (the compose testbed needs a Docker engine)",
    ) {
        return;
    }
    if let Err(why) = docker_answers() {
        require(
            false,
            &format!("{why} (the compose testbed needs a running Docker engine)"),
        );
        return;
    }
    let (status, out) = script(&["check"]);
    assert!(status.success(), "compose check failed:\n{out}");
    for step in [
        "check 1: connectivity on vxlan",
        "check 2: connectivity on udp",
        "check 3: etcd member etcd2 stopped",
        "check 4: node3 killed",
        "no route to",
        "check 5: etcd2 and node3 started again",
        "again; node1 and node2 route to it",
        "compose check passed",
    ] {
        assert!(out.contains(step), "missing {step:?}:\n{out}");
    }
    // Every matrix was complete: 6 pods (30 pairs), 7 after the etcd check (42), 5 with
    // node3 gone (20), 6 with it back (30).
    for pairs in ["30 of 30", "42 of 42", "20 of 20"] {
        assert!(
            out.contains(&format!("{pairs} pod pairs reach")),
            "{pairs}:\n{out}"
        );
    }
    // The README's command: every backend's matrix and iperf3 figure, then removed.
    let (status, out) = script(&["run", "--pods", "1"]);
    assert!(status.success(), "compose run failed:\n{out}");
    for row in ["vxlan    6/6", "udp      6/6"] {
        assert!(out.contains(row), "summary row {row:?} missing:\n{out}");
    }
}
