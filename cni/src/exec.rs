//! Calling the delegate plugin: found in `CNI_PATH`, run with the CNI environment of the call
//! and the config on stdin, bounded in time. Behind a trait so command logic is tested with a
//! recording fake; the real one is exercised by the root tests with the reference plugins.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{code, CniError};

/// The CNI environment of one plugin call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Call {
    pub command: String,
    pub container_id: String,
    /// Empty: not set (DEL and GC may run without a namespace).
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

pub trait Exec {
    /// Runs plugin `plugin` for `call` with `stdin`; its stdout on success, its CNI error
    /// otherwise.
    fn run(&self, plugin: &str, call: &Call, stdin: &[u8]) -> Result<Vec<u8>, CniError>;
}

/// Plugins from the directories of `CNI_PATH`.
#[derive(Debug, Clone)]
pub struct PathExec {
    path: String,
    timeout: Duration,
}

impl PathExec {
    pub fn new(cni_path: &str, timeout: Duration) -> Self {
        PathExec {
            path: cni_path.to_string(),
            timeout,
        }
    }

    /// The plugin's executable: the first `dir/plugin` of CNI_PATH that is a file.
    pub fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        if plugin.is_empty() || plugin.contains('/') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("delegate plugin name {plugin:?} is not a plugin name"),
            ));
        }
        std::env::split_paths(&self.path)
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "delegate plugin {plugin:?} not found in CNI_PATH ({}): install it there \
                         (Debian: containernetworking-plugins) or name another delegate.type",
                        self.path
                    ),
                )
            })
    }
}

impl Exec for PathExec {
    fn run(&self, plugin: &str, call: &Call, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
        let exe = self.find(plugin)?;
        let mut cmd = Command::new(&exe);
        cmd.env("CNI_COMMAND", &call.command)
            .env("CNI_CONTAINERID", &call.container_id)
            .env("CNI_IFNAME", &call.ifname)
            .env("CNI_ARGS", &call.args)
            .env("CNI_PATH", &self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if call.netns.is_empty() {
            cmd.env_remove("CNI_NETNS");
        } else {
            cmd.env("CNI_NETNS", &call.netns);
        }
        let io = |what: &str, e: std::io::Error| {
            CniError::new(code::IO, format!("{what} {}", exe.display())).with_details(e.to_string())
        };
        let mut child = cmd.spawn().map_err(|e| io("starting", e))?;
        if let Some(mut i) = child.stdin.take() {
            // A plugin that exits without reading stdin closes the pipe: not our error.
            let _ = i.write_all(stdin);
        }
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_end(&mut b);
            }
            b
        });
        let err_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut b);
            }
            b
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait().map_err(|e| io("waiting for", e))? {
                Some(s) => break s,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CniError::new(
                        code::IO,
                        format!(
                            "{plugin} {} did not finish in {:?}; killed",
                            call.command, self.timeout
                        ),
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            Err(CniError::from_plugin_output(plugin, &stdout, &stderr))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn runs_from_path_with_the_call_environment() {
        let t = tempfile::tempdir().unwrap();
        script(
            t.path(),
            "echoer",
            r#"cat >/dev/null; echo "{\"cmd\":\"$CNI_COMMAND\",\"ns\":\"${CNI_NETNS-unset}\",\"id\":\"$CNI_CONTAINERID\"}""#,
        );
        script(
            t.path(),
            "failer",
            r#"echo '{"code":11,"msg":"later"}'; exit 1"#,
        );
        script(t.path(), "sleeper", "sleep 5");
        let path = format!("/nonexistent:{}", t.path().display());
        let x = PathExec::new(&path, Duration::from_secs(5));
        let call = Call {
            command: "DEL".into(),
            container_id: "c1".into(),
            ..Default::default()
        };
        let out = x.run("echoer", &call, b"{}").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["cmd"].as_str(), v["ns"].as_str(), v["id"].as_str()),
            (Some("DEL"), Some("unset"), Some("c1"))
        );
        let e = x.run("failer", &call, b"{}").unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (11, "failer: later"));
        let e = x.run("missing", &call, b"{}").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("not found in CNI_PATH"), "{e}");
        assert_eq!(
            x.run("../x", &call, b"").unwrap_err().code,
            code::INVALID_CONFIG
        );
        let quick = PathExec::new(&path, Duration::from_millis(200));
        let e = quick.run("sleeper", &call, b"").unwrap_err();
        assert!(e.msg.contains("did not finish"), "{e}");
    }
}
