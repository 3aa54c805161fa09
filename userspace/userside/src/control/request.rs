//! The control socket's requests: their shapes, their checks, and reading one.
use super::*;

/// A request on a bridge's control socket: one JSON line, at most
/// [`MAX_REQUEST`] bytes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Intercept(InterceptRequest),
    Leave {
        name: String,
    },
    List {
        #[serde(default)]
        namespace: Option<String>,
    },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct InterceptRequest {
    pub name: String,
    pub workload: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The workload's port: a number, or a container's (a service's) port
    /// name.
    pub remote: tpbpf_kube::PortRef,
    /// The local port (default: the number `remote` resolves to).
    #[serde(default)]
    pub local: Option<u16>,
    #[serde(flatten)]
    pub mode: ModeRequest,
}

/// How an intercept takes a pod's traffic.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ModeRequest {
    Steal,
    Mirror,
    Header { header: String, value: String },
    Path { prefix: String },
}

impl ModeRequest {
    pub(super) fn to_mode(&self) -> InterceptMode {
        match self {
            ModeRequest::Steal => InterceptMode::Steal,
            ModeRequest::Mirror => InterceptMode::Mirror,
            ModeRequest::Header { header, value } => InterceptMode::Header {
                name: header.clone(),
                value: value.clone(),
            },
            ModeRequest::Path { prefix } => InterceptMode::PathPrefix(prefix.clone()),
        }
    }
}

/// The largest request tpbpfd reads; past it the connection is refused.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Requests served at once; more wait.
pub(super) const MAX_CONNECTIONS: usize = 16;
/// Pods one intercept holds at most (each is a watcher and an agent
/// request).
pub(super) const MAX_PODS: usize = 256;
/// Names (intercepts, workloads, namespaces, headers) longer than this are
/// refused: Kubernetes names are at most 253 bytes.
pub(super) const MAX_NAME: usize = 253;

impl InterceptRequest {
    pub(super) fn check(&self) -> Result<(), String> {
        let mut names = vec![&self.name, &self.workload];
        names.extend(self.namespace.as_ref());
        if let ModeRequest::Header { header, .. } = &self.mode {
            names.push(header);
        }
        if let Some(n) = names.iter().find(|n| n.is_empty() || n.len() > MAX_NAME) {
            return Err(format!(
                "`{}`: names are 1 to {MAX_NAME} bytes",
                n.chars().take(40).collect::<String>()
            ));
        }
        self.remote.check()?;
        if self.local == Some(0) {
            return Err("local port 0 is no port".into());
        }
        match &self.mode {
            ModeRequest::Header { value, .. } if value.len() > 4096 => {
                Err("the header value is over 4 KiB".into())
            }
            ModeRequest::Path { prefix } if prefix.len() > 4096 || !prefix.starts_with('/') => {
                Err("the path prefix must start with / and be at most 4 KiB".into())
            }
            _ => Ok(()),
        }
    }
}

/// One request line, at most [`MAX_REQUEST`] bytes, within 10 s.
pub(super) async fn read_request(rd: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    use tokio::io::AsyncReadExt;
    let mut line = String::new();
    let mut reader = BufReader::new(rd.take(MAX_REQUEST as u64 + 1));
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Err(_) => return Err("no request within 10 s".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST || !line.ends_with('\n') {
        return Err(format!(
            "a request is one line of at most {MAX_REQUEST} bytes"
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("not a request: {e}"))
}

#[cfg(test)]
mod tests {

    use super::*;

    fn request(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }

    fn intercept_request(mode: ModeRequest) -> InterceptRequest {
        InterceptRequest {
            name: "dev".into(),
            workload: "deployment/web".into(),
            namespace: None,
            remote: tpbpf_kube::PortRef::Number(80),
            local: Some(8080),
            mode,
        }
    }

    // Requests.

    #[test]
    fn a_port_is_a_number_or_a_kubernetes_port_name() {
        let r = request(r#"{"op":"intercept","name":"dev","workload":"svc/web","remote":"http","mode":"steal"}"#).unwrap();
        let Request::Intercept(i) = r else {
            panic!("not an intercept")
        };
        assert_eq!(i.remote, tpbpf_kube::PortRef::Name("http".into()));
        assert_eq!(i.local, None);
        assert_eq!(i.check(), Ok(()));
        for bad in [
            "HTTP",
            "-http",
            "a--b",
            "1234",
            "sixteen-letters-",
            "",
            "h/t",
        ] {
            let mut i = intercept_request(ModeRequest::Steal);
            i.remote = tpbpf_kube::PortRef::Name(bad.into());
            assert!(i.check().is_err(), "{bad:?} taken as a port name");
        }
        let mut i = intercept_request(ModeRequest::Steal);
        i.local = Some(0);
        assert!(i.check().is_err());
        i.local = None;
        i.remote = tpbpf_kube::PortRef::Number(0);
        assert!(i.check().is_err());
    }

    #[test]
    fn each_request_parses_from_its_json_line() {
        let r = request(r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"steal"}"#).unwrap();
        match r {
            Request::Intercept(i) => {
                assert_eq!((i.name.as_str(), i.workload.as_str()), ("dev", "web"));
                assert_eq!(
                    (i.remote, i.local, i.namespace),
                    (tpbpf_kube::PortRef::Number(80), Some(8080), None)
                );
                assert_eq!(i.mode.to_mode(), InterceptMode::Steal);
            }
            other => panic!("{other:?}"),
        }
        let r = request(r#"{"op":"intercept","name":"dev","workload":"web","namespace":"shop","remote":80,"local":8080,"mode":"header","header":"x-dev","value":"me"}"#).unwrap();
        let Request::Intercept(i) = r else {
            panic!("{r:?}")
        };
        assert_eq!(i.namespace.as_deref(), Some("shop"));
        assert_eq!(
            i.mode.to_mode(),
            InterceptMode::Header {
                name: "x-dev".into(),
                value: "me".into()
            }
        );
        let r = request(r#"{"op":"intercept","name":"d","workload":"w","remote":1,"local":2,"mode":"path","prefix":"/api"}"#).unwrap();
        let Request::Intercept(i) = r else {
            panic!("{r:?}")
        };
        assert_eq!(i.mode.to_mode(), InterceptMode::PathPrefix("/api".into()));
        assert!(matches!(
            request(
                r#"{"op":"intercept","name":"d","workload":"w","remote":1,"local":2,"mode":"mirror"}"#
            ),
            Ok(Request::Intercept(InterceptRequest {
                mode: ModeRequest::Mirror,
                ..
            }))
        ));
        assert!(
            matches!(request(r#"{"op":"leave","name":"dev"}"#), Ok(Request::Leave { name }) if name == "dev")
        );
        assert!(matches!(
            request(r#"{"op":"list"}"#),
            Ok(Request::List { namespace: None })
        ));
        assert!(matches!(
            request(r#"{"op":"list","namespace":"shop"}"#),
            Ok(Request::List { namespace: Some(n) }) if n == "shop"
        ));
    }

    #[test]
    fn what_the_cli_sends_is_what_tpbpfd_reads() {
        let sent = Request::Intercept(intercept_request(ModeRequest::Header {
            header: "x-dev".into(),
            value: "me".into(),
        }));
        let line = serde_json::to_string(&sent).unwrap();
        let Ok(Request::Intercept(got)) = request(&line) else {
            panic!("{line}")
        };
        assert_eq!(got.name, "dev");
        assert!(
            matches!(&got.mode, ModeRequest::Header { header, value } if header == "x-dev" && value == "me")
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        for line in [
            r#"{"op":"remove","name":"dev"}"#,
            r#"{"name":"dev"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"teleport"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":70000,"local":8080,"mode":"steal"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"header","header":"x"}"#,
            r#"{"op":"leave"}"#,
        ] {
            assert!(request(line).is_err(), "{line} was taken");
        }
    }

    #[test]
    fn names_and_filters_are_checked_before_anything_is_asked_of_the_cluster() {
        assert_eq!(intercept_request(ModeRequest::Steal).check(), Ok(()));
        let long = "a".repeat(MAX_NAME + 1);
        let cases: Vec<(InterceptRequest, &str)> = vec![
            (
                InterceptRequest {
                    name: String::new(),
                    ..intercept_request(ModeRequest::Steal)
                },
                "names are 1 to 253 bytes",
            ),
            (
                InterceptRequest {
                    workload: long.clone(),
                    ..intercept_request(ModeRequest::Steal)
                },
                "names are 1 to 253 bytes",
            ),
            (
                InterceptRequest {
                    namespace: Some(String::new()),
                    ..intercept_request(ModeRequest::Mirror)
                },
                "names are 1 to 253 bytes",
            ),
            (
                intercept_request(ModeRequest::Header {
                    header: String::new(),
                    value: "me".into(),
                }),
                "names are 1 to 253 bytes",
            ),
            (
                intercept_request(ModeRequest::Header {
                    header: "x-dev".into(),
                    value: "v".repeat(4097),
                }),
                "header value is over 4 KiB",
            ),
            (
                intercept_request(ModeRequest::Path {
                    prefix: "api".into(),
                }),
                "must start with /",
            ),
            (
                intercept_request(ModeRequest::Path {
                    prefix: format!("/{}", "p".repeat(4096)),
                }),
                "at most 4 KiB",
            ),
        ];
        for (req, why) in cases {
            let e = req.check().expect_err(why);
            assert!(e.contains(why), "{e}");
            assert!(e.len() < 200, "the refusal quotes too much: {e}");
        }
        let edge = InterceptRequest {
            name: "a".repeat(MAX_NAME),
            ..intercept_request(ModeRequest::Path { prefix: "/".into() })
        };
        assert_eq!(edge.check(), Ok(()));
    }

    /// `read_request` on one end of a socket pair, after `write` on the
    /// other (then closed).
    async fn read_after(write: &[u8]) -> Result<Request, String> {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (rd, _wr) = a.into_split();
        let data = write.to_vec();
        let writer = tokio::spawn(async move {
            let _ = b.write_all(&data).await;
            let _ = b.shutdown().await;
        });
        let got = read_request(rd).await;
        writer.abort();
        got
    }

    #[tokio::test]
    async fn a_request_is_one_json_line_within_the_size_bound() {
        let got = read_after(b"{\"op\":\"leave\",\"name\":\"dev\"}\n").await;
        assert!(matches!(got, Ok(Request::Leave { name }) if name == "dev"));
        let e = read_after(b"{\"op\":\"list\"}").await.unwrap_err();
        assert!(e.contains("one line of at most"), "{e}");
        let mut big = vec![b' '; MAX_REQUEST + 10];
        big.push(b'\n');
        let e = read_after(&big).await.unwrap_err();
        assert!(e.contains("one line of at most 65536 bytes"), "{e}");
        let e = read_after(b"intercept web\n").await.unwrap_err();
        assert!(e.starts_with("not a request"), "{e}");
    }
}
