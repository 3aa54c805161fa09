//! A container's probes as the kubelet runs them: `tcpSocket` and `httpGet`
//! from the node's network namespace to the pod's address (the kubelet runs
//! in the node's), `exec` inside the container; with
//! `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`,
//! `successThreshold` and `failureThreshold` and their Kubernetes defaults.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;
use tpbpf_lab::{spec, Lab};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Port {
    Number(u16),
    /// A container port's name.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Tcp {
        host: Option<String>,
        port: Port,
    },
    Http {
        host: Option<String>,
        port: Port,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Exec(Vec<String>),
    /// A kind the lab does not run (gRPC): the probe fails, saying so.
    Unsupported(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn port_of(v: &Value) -> Port {
    match v {
        Value::Number(n) => Port::Number(n.as_u64().unwrap_or(0) as u16),
        Value::String(s) => s
            .parse()
            .map(Port::Number)
            .unwrap_or_else(|_| Port::Name(s.clone())),
        _ => Port::Number(0),
    }
}

impl Probe {
    /// The probe `v` (a container's `readinessProbe` or `livenessProbe`),
    /// `None` when there is none.
    pub fn from_json(v: &Value) -> Option<Probe> {
        if !v.is_object() {
            return None;
        }
        let host = |a: &Value| a["host"].as_str().map(str::to_string);
        let action = if v["tcpSocket"].is_object() {
            let a = &v["tcpSocket"];
            Action::Tcp {
                host: host(a),
                port: port_of(&a["port"]),
            }
        } else if v["httpGet"].is_object() {
            let a = &v["httpGet"];
            Action::Http {
                host: host(a),
                port: port_of(&a["port"]),
                path: a["path"].as_str().unwrap_or("/").to_string(),
                https: a["scheme"].as_str() == Some("HTTPS"),
                headers: a["httpHeaders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| {
                        Some((
                            h["name"].as_str()?.to_string(),
                            h["value"].as_str()?.to_string(),
                        ))
                    })
                    .collect(),
            }
        } else if v["exec"].is_object() {
            Action::Exec(
                v["exec"]["command"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect(),
            )
        } else if v["grpc"].is_object() {
            Action::Unsupported("a gRPC probe (not in the lab)".into())
        } else {
            Action::Unsupported("a probe without tcpSocket, httpGet or exec".into())
        };
        let secs = |k: &str, default: u64, min: u64| {
            Duration::from_secs(v[k].as_u64().unwrap_or(default).max(min))
        };
        let count = |k: &str, default: u64| v[k].as_u64().unwrap_or(default).max(1) as u32;
        Some(Probe {
            action,
            initial_delay: secs("initialDelaySeconds", 0, 0),
            period: secs("periodSeconds", 10, 1),
            timeout: secs("timeoutSeconds", 1, 1),
            success_threshold: count("successThreshold", 1),
            failure_threshold: count("failureThreshold", 3),
        })
    }

    /// Runs the probe once against the agent pod on `node` (container
    /// ports `ports`, for named ports): `Err` says why it failed, as the
    /// kubelet's event would ("dial tcp ...: connection refused").
    pub fn run(&self, lab: &Lab, node: &spec::Node, ports: &Value) -> Result<(), String> {
        let resolve = |port: &Port| -> Result<u16, String> {
            match port {
                Port::Number(0) => Err("port 0".into()),
                Port::Number(n) => Ok(*n),
                Port::Name(name) => ports
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == name.as_str())
                    .and_then(|p| p["containerPort"].as_u64())
                    .map(|p| p as u16)
                    .ok_or_else(|| format!("no container port named {name}")),
            }
        };
        let addr = |host: &Option<String>, port: &Port| -> Result<SocketAddr, String> {
            let host = host.clone().unwrap_or_else(|| node.agent_ip.to_string());
            format!("{host}:{}", resolve(port)?)
                .parse()
                .map_err(|e| format!("{host}: {e}"))
        };
        let node_ns = lab.node_netns(node.name);
        let timeout = self.timeout;
        match &self.action {
            Action::Tcp { host, port } => {
                let a = addr(host, port)?;
                in_node(&node_ns, move || {
                    TcpStream::connect_timeout(&a, timeout)
                        .map(drop)
                        .map_err(|e| format!("dial tcp {a}: {e}"))
                })
            }
            Action::Http {
                host,
                port,
                path,
                https,
                headers,
            } => {
                if *https {
                    return Err("an HTTPS probe (not in the lab)".into());
                }
                let a = addr(host, port)?;
                let (path, headers) = (path.clone(), headers.clone());
                in_node(&node_ns, move || http_get(a, &path, &headers, timeout))
            }
            Action::Exec(argv) => lab.exec_in_agent(node.name, argv, timeout),
            Action::Unsupported(what) => Err(what.clone()),
        }
    }
}

/// Runs `f` in the node's network namespace, where the kubelet is.
fn in_node(
    netns: &str,
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    tpbpf_lab::in_netns(netns, move || Some(f()))
        .unwrap_or_else(|| Err(format!("entering the node's network namespace {netns}")))
}

/// One `GET` (HTTP/1.1, `Connection: close`), as the kubelet's prober
/// sends it: success for a status from 200 to 399. By hand: one blocking
/// request on a thread that entered the node's namespace, where an HTTP
/// client's runtime would not follow.
fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("Get \"{url}\": dial tcp {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.contains(&b'\n') && got.len() < 1024 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("Get \"{url}\": {e}")),
        }
    }
    let line = String::from_utf8_lossy(&got);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": not an HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kubernetes_defaults_apply_to_what_a_probe_leaves_out() {
        let p = Probe::from_json(&json!({"tcpSocket": {"port": 4391}})).unwrap();
        assert_eq!(p.period, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!(p.failure_threshold, 3);
        assert_eq!(p.success_threshold, 1);
        assert_eq!(p.initial_delay, Duration::ZERO);
        assert!(Probe::from_json(&Value::Null).is_none());
        let p = Probe::from_json(
            &json!({"httpGet": {"port": "http", "path": "/healthz"}, "periodSeconds": 2, "failureThreshold": 1}),
        )
        .unwrap();
        assert_eq!(p.period, Duration::from_secs(2));
        assert_eq!(p.failure_threshold, 1);
        assert!(matches!(p.action, Action::Http { port: Port::Name(ref n), .. } if n == "http"));
    }

    #[test]
    fn an_http_probe_passes_on_2xx_and_3xx_only() {
        for (answer, ok) in [
            ("HTTP/1.1 200 OK\r\n\r\n", true),
            ("HTTP/1.1 302 Found\r\n\r\n", true),
            ("HTTP/1.1 503 Service Unavailable\r\n\r\n", false),
            ("garbage", false),
        ] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                s.write_all(answer.as_bytes()).unwrap();
                req
            });
            let r = http_get(
                addr,
                "/ready",
                &[("X-A".into(), "b".into())],
                Duration::from_secs(2),
            );
            let req = t.join().unwrap();
            assert!(req.starts_with("GET /ready HTTP/1.1\r\n"), "{req}");
            assert!(req.contains("User-Agent: kube-probe/"), "{req}");
            assert!(req.contains("X-A: b\r\n"), "{req}");
            assert_eq!(r.is_ok(), ok, "{answer}: {r:?}");
        }
        // Nothing listening: refused, said as the kubelet says it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = http_get(addr, "/", &[], Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("dial tcp"), "{e}");
    }
}
