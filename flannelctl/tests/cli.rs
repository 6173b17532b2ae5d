//! The binary's errors: one line for humans, exit status 1, nothing touched. (Also makes
//! `cargo test --workspace` build `flannelctl`, which the testbed test runs.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_flannelctl");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn errors_are_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("none.conflist");
    let (code, err) = run(&["pod", "up", "p1", "--conflist", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("flannelctl: reading "), "{err}");
    assert!(err.contains("No such file"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );

    let bad = t.path().join("bad.conflist");
    std::fs::write(
        &bad,
        r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../x"}]}"#,
    )
    .unwrap();
    let (code, err) = run(&["pod", "up", "p1", "--conflist", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("plugins[0].type"), "{err}");

    let (code, err) = run(&["pod", "up", "../p", "--conflist", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("pod name"), "{err}");

    let (code, err) = run(&["pod", "up", "p1", "--port", "80"]);
    assert_eq!(code, 2, "clap usage error");
    assert!(err.contains("HOST:CONTAINER"), "{err}");
}

#[test]
fn docker_opts_writes_the_scripts_file() {
    let t = tempfile::tempdir().unwrap();
    let subnet = t.path().join("subnet.env");
    std::fs::write(
        &subnet,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let out = t.path().join("docker_opts.env");
    let (s, o) = (subnet.to_str().unwrap(), out.to_str().unwrap());
    let (code, err) = run(&["docker-opts", "-f", s, "-d", o, "-c", "-k", "OPTS"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "OPTS=\" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
    );
    let (code, _) = run(&["docker-opts", "-f", s, "-d", o, "-i", "-m"]);
    assert_eq!(code, 0);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
    );
    // No subnet file: an error (the script wrote empty options and Docker took 172.17/16).
    let missing = t.path().join("none.env");
    let (code, err) = run(&["docker-opts", "-f", missing.to_str().unwrap(), "-d", o]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("flannelctl: reading the subnet file"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
