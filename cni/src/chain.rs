//! Running a plugin chain (a `.conflist`) the way a container runtime does (libcni's rules):
//! each plugin gets the list's `name` and `cniVersion`, the previous plugin's result as
//! `prevResult`, and `runtimeConfig` with only the capabilities it declares (e.g. portmap's
//! `portMappings`). ADD runs the plugins in order and, if one fails, DEL of those already run
//! in reverse; DEL runs in reverse and keeps going past errors. Used by `flannelctl pod up`
//! and by the tests to attach pods as kubelet/containerd would.
//!
//! As libcni, a single plugin config (an old `.conf`, e.g. flannel's
//! `{"name":"cbr0","type":"flannel",…}`) is read as a list of that one plugin, and a missing
//! `cniVersion` means 0.1.0.

use serde_json::{Map, Value};

use crate::error::{code, CniError};
use crate::exec::{Call, Exec};
use crate::version;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Map<String, Value>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

impl ConfList {
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE, "conflist is not valid JSON").with_details(e.to_string())
        })?;
        let cni_version = match v.get("cniVersion") {
            None | Some(Value::Null) => version::IMPLIED.to_string(),
            Some(Value::String(s)) if s.is_empty() => version::IMPLIED.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(invalid(format!(
                    "cniVersion: must be a string, got {other}"
                )))
            }
        };
        version::check(&cni_version)?;
        // A single plugin config (`.conf`): a list of that one plugin.
        let single;
        let plugins_v = match v.get("plugins") {
            None if v.get("type").is_some() => {
                single = Value::Array(vec![v.clone()]);
                Some(&single)
            }
            p => p,
        };
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("name: missing"))?
            .to_string();
        let plugins = plugins_v
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid("plugins: missing or empty"))?
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let o = p
                    .as_object()
                    .ok_or_else(|| invalid(format!("plugins[{i}]: must be an object")))?;
                match o.get("type").and_then(Value::as_str) {
                    Some(t) if !t.is_empty() && !t.contains('/') => Ok(o.clone()),
                    _ => Err(invalid(format!(
                        "plugins[{i}].type: missing or not a plugin name"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ConfList {
            cni_version,
            name,
            plugins,
        })
    }

    /// The config plugin `i` is called with.
    pub fn plugin_conf(
        &self,
        i: usize,
        prev: Option<&Value>,
        runtime: &Map<String, Value>,
    ) -> Value {
        let mut c = self.plugins[i].clone();
        c.insert("name".into(), self.name.clone().into());
        c.insert("cniVersion".into(), self.cni_version.clone().into());
        if let Some(p) = prev {
            c.insert("prevResult".into(), p.clone());
        }
        let caps = c.get("capabilities").and_then(Value::as_object).cloned();
        let rc: Map<String, Value> = runtime
            .iter()
            .filter(|(k, _)| {
                caps.as_ref()
                    .is_some_and(|m| m.get(*k).and_then(Value::as_bool) == Some(true))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rc.is_empty() {
            c.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(c)
    }

    fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// ADD through every plugin; the last result. On failure the plugins already run get DEL.
    pub fn add(
        &self,
        exec: &dyn Exec,
        call: &Call,
        runtime: &Map<String, Value>,
    ) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for i in 0..self.plugins.len() {
            let conf = self.plugin_conf(i, prev.as_ref(), runtime);
            let add = Call {
                command: "ADD".into(),
                ..call.clone()
            };
            let out = exec
                .run(self.plugin_type(i), &add, conf.to_string().as_bytes())
                .and_then(|out| {
                    serde_json::from_slice::<Value>(&out).map_err(|e| {
                        CniError::new(code::DECODE, format!("{} ADD result", self.plugin_type(i)))
                            .with_details(e.to_string())
                    })
                });
            match out {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let _ = self.del_upto(exec, call, runtime, prev.as_ref(), i);
                    return Err(e);
                }
            }
        }
        prev.ok_or_else(|| invalid("plugins: empty"))
    }

    /// DEL through every plugin in reverse; `prev` is the cached ADD result, if any. Errors
    /// are collected; the first is returned after all plugins ran.
    pub fn del(
        &self,
        exec: &dyn Exec,
        call: &Call,
        runtime: &Map<String, Value>,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        self.del_upto(exec, call, runtime, prev, self.plugins.len())
    }

    fn del_upto(
        &self,
        exec: &dyn Exec,
        call: &Call,
        runtime: &Map<String, Value>,
        prev: Option<&Value>,
        n: usize,
    ) -> Result<(), CniError> {
        let mut first = None;
        for i in (0..n).rev() {
            let conf = self.plugin_conf(i, prev, runtime);
            let del = Call {
                command: "DEL".into(),
                ..call.clone()
            };
            if let Err(e) = exec.run(self.plugin_type(i), &del, conf.to_string().as_bytes()) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK through every plugin in order with the cached ADD result.
    pub fn check(
        &self,
        exec: &dyn Exec,
        call: &Call,
        runtime: &Map<String, Value>,
        prev: &Value,
    ) -> Result<(), CniError> {
        for i in 0..self.plugins.len() {
            let conf = self.plugin_conf(i, Some(prev), runtime);
            let chk = Call {
                command: "CHECK".into(),
                ..call.clone()
            };
            exec.run(self.plugin_type(i), &chk, conf.to_string().as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    const LIST: &[u8] = br#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[
        {"type":"flannel","delegate":{"hairpinMode":true}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    struct Rec {
        calls: RefCell<Vec<(String, String, Value)>>,
        fail: Option<&'static str>,
    }

    impl Exec for Rec {
        fn run(&self, plugin: &str, call: &Call, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
            let v: Value = serde_json::from_slice(stdin).unwrap();
            self.calls
                .borrow_mut()
                .push((plugin.into(), call.command.clone(), v));
            if self.fail == Some(plugin) && call.command == "ADD" {
                return Err(CniError::new(5, "boom"));
            }
            Ok(json!({"cniVersion": "1.0.0", "from": plugin})
                .to_string()
                .into_bytes())
        }
    }

    #[test]
    fn add_chains_results_and_capabilities() {
        let l = ConfList::parse(LIST).unwrap();
        let rec = Rec {
            calls: RefCell::new(Vec::new()),
            fail: None,
        };
        let mut rt = Map::new();
        rt.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        rt.insert("bandwidth".into(), json!({}));
        let r = l.add(&rec, &Call::default(), &rt).unwrap();
        assert_eq!(r["from"], "portmap");
        let c = rec.calls.borrow();
        assert_eq!(c[0].2["name"], "cbr0");
        assert_eq!(c[0].2.get("prevResult"), None);
        assert_eq!(
            c[0].2.get("runtimeConfig"),
            None,
            "flannel declares no capability"
        );
        assert_eq!(c[1].2["prevResult"]["from"], "flannel");
        assert_eq!(
            c[1].2["runtimeConfig"],
            json!({"portMappings": rt["portMappings"]})
        );
    }

    #[test]
    fn a_failed_add_undoes_what_ran_and_del_runs_in_reverse() {
        let l = ConfList::parse(LIST).unwrap();
        let rec = Rec {
            calls: RefCell::new(Vec::new()),
            fail: Some("portmap"),
        };
        assert_eq!(
            l.add(&rec, &Call::default(), &Map::new()).unwrap_err().msg,
            "boom"
        );
        let order: Vec<(String, String)> = rec
            .calls
            .borrow()
            .iter()
            .map(|c| (c.0.clone(), c.1.clone()))
            .collect();
        assert_eq!(
            order,
            [("flannel", "ADD"), ("portmap", "ADD"), ("flannel", "DEL")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        rec.calls.borrow_mut().clear();
        l.del(&rec, &Call::default(), &Map::new(), None).unwrap();
        let order: Vec<String> = rec.calls.borrow().iter().map(|c| c.0.clone()).collect();
        assert_eq!(order, ["portmap", "flannel"]);
    }

    #[test]
    fn old_single_confs_and_unversioned_lists_are_read() {
        let l = ConfList::parse(
            br#"{"name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#,
        )
        .unwrap();
        assert_eq!((l.cni_version.as_str(), l.name.as_str()), ("0.1.0", "cbr0"));
        assert_eq!(l.plugins.len(), 1);
        let c = l.plugin_conf(0, None, &Map::new());
        assert_eq!(
            (c["type"].as_str(), c["cniVersion"].as_str()),
            (Some("flannel"), Some("0.1.0"))
        );
        assert_eq!(c["delegate"]["isDefaultGateway"], true);
        let l = ConfList::parse(br#"{"name":"n","plugins":[{"type":"flannel"}]}"#).unwrap();
        assert_eq!(l.cni_version, "0.1.0");
        let l =
            ConfList::parse(br#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"flannel"}]}"#)
                .unwrap();
        assert_eq!(l.cni_version, "0.2.0");
    }

    #[test]
    fn bad_lists_are_named() {
        for (l, text) in [
            (&b"{"[..], "not valid JSON"),
            (
                br#"{"cniVersion":1,"name":"x","plugins":[{"type":"a"}]}"#,
                "cniVersion",
            ),
            (
                br#"{"cniVersion":"0.0.1","name":"x","plugins":[{"type":"a"}]}"#,
                "0.0.1",
            ),
            (br#"{"cniVersion":"1.0.0","name":"x"}"#, "plugins"),
            (
                br#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#,
                "name",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
                "plugins",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../a"}]}"#,
                "plugins[0].type",
            ),
        ] {
            let e = ConfList::parse(l).unwrap_err();
            assert!(e.msg.contains(text), "{e} should name {text}");
        }
    }
}
