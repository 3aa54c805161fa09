//! Taking credentials out of what `gather-logs` collects: the kubeconfig's
//! own (known exactly) and anything shaped like one (PEM blocks, JWTs,
//! `Authorization:` values, `token`/`password`/`secret` keys' values).
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The kubeconfig file in use: `path`, else the first of $KUBECONFIG, else
/// ~/.kube/config.
fn kubeconfig_path(path: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = path {
        return Some(p.to_path_buf());
    }
    if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        return std::env::split_paths(&k).next();
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"))
}

fn read_kubeconfig(path: Option<&Path>) -> Option<(PathBuf, Value)> {
    let path = kubeconfig_path(path)?;
    let text = std::fs::read_to_string(&path).ok()?;
    let v: Value = serde_saphyr::from_str(&text).ok()?;
    Some((path, v))
}

/// Every credential of the kubeconfig (all its users, not only the
/// context's): tokens, token files' and certificate files' contents,
/// passwords, and certificate and key data both as given (base64) and
/// decoded.
pub fn kubeconfig_secrets(path: Option<&Path>, _context: Option<&str>) -> Vec<String> {
    use base64::Engine;
    let Some((_, kc)) = read_kubeconfig(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for u in kc["users"].as_array().into_iter().flatten() {
        let user = &u["user"];
        for key in ["token", "password"] {
            if let Some(s) = user[key].as_str() {
                out.push(s.to_string());
            }
        }
        for key in ["tokenFile", "client-certificate", "client-key"] {
            if let Some(text) = user[key]
                .as_str()
                .and_then(|p| std::fs::read_to_string(p).ok())
            {
                out.push(text.trim().to_string());
            }
        }
        for key in ["client-certificate-data", "client-key-data"] {
            if let Some(data) = user[key].as_str() {
                out.push(data.to_string());
                if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(data) {
                    out.push(String::from_utf8_lossy(&raw).trim().to_string());
                }
            }
        }
    }
    // Longest first: a secret that contains another goes whole.
    out.retain(|s| s.len() >= 8);
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// `text` without `secrets` and without anything shaped like a credential.
pub fn redact(text: &str, secrets: &[String]) -> String {
    use std::sync::OnceLock;
    static PATTERNS: OnceLock<Vec<(regex::Regex, &'static str)>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        [
            (
                r"(?s)-----BEGIN [A-Z0-9 ]+-----.*?-----END [A-Z0-9 ]+-----",
                "[PEM block removed]",
            ),
            (
                r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
                "[JWT removed]",
            ),
            (
                r#"(?i)(authorization["']?\s*[:=]\s*["']?(?:bearer\s+|basic\s+)?)[^\s"',}]+"#,
                "${1}[removed]",
            ),
            (
                r#"(?i)((?:token|password|passwd|secret|client-key-data|client-certificate-data)["']?\s*[:=]\s*["']?)[^\s"',}]{6,}"#,
                "${1}[removed]",
            ),
        ]
        .into_iter()
        .filter_map(|(p, r)| regex::Regex::new(p).ok().map(|re| (re, r)))
        .collect()
    });
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "[credential removed]");
        // The same in a JSON string, where newlines are `\n`.
        let escaped = s.replace('\n', "\\n");
        if escaped != *s {
            out = out.replace(escaped.as_str(), "[credential removed]");
        }
    }
    for (re, with) in patterns {
        out = re.replace_all(&out, *with).into_owned();
    }
    out
}

/// The kubeconfig context in force, without credentials: which file, the
/// context, its cluster's server, namespace, user, and how it
/// authenticates.
pub fn context_summary(path: Option<&Path>, context: Option<&str>) -> Value {
    let Some((path, kc)) = read_kubeconfig(path) else {
        return json!({"kubeconfig": kubeconfig_path(path), "error": "no readable kubeconfig"});
    };
    let name = context
        .map(str::to_string)
        .or_else(|| kc["current-context"].as_str().map(str::to_string))
        .unwrap_or_default();
    let find = |list: &str, n: &str| {
        kc[list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some(n))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let ctx = find("contexts", &name);
    let cluster = ctx["context"]["cluster"].as_str().unwrap_or_default();
    let user = ctx["context"]["user"].as_str().unwrap_or_default();
    let u = &find("users", user)["user"];
    let mut auth = Vec::new();
    for (key, what) in [
        ("token", "token"),
        ("tokenFile", "token file"),
        ("client-certificate-data", "client certificate"),
        ("client-certificate", "client certificate file"),
        ("username", "basic auth"),
    ] {
        if !u[key].is_null() {
            auth.push(what.to_string());
        }
    }
    if let Some(cmd) = u["exec"]["command"].as_str() {
        auth.push(format!("exec plugin {cmd}"));
    }
    json!({
        "kubeconfig": path,
        "context": name,
        "cluster": cluster,
        "server": find("clusters", cluster)["cluster"]["server"],
        "namespace": ctx["context"]["namespace"],
        "user": user,
        "auth": auth,
    })
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_and_their_shapes_are_taken_out() {
        let secrets = vec!["lab-0123456789abcdef".to_string()];
        let text = "dialing with lab-0123456789abcdef\n\
                    Authorization: Bearer s3cr3t-value\n\
                    {\"token\":\"abcdefghijk\",\"user\":\"dev\"}\n\
                    jwt eyJhbGciOi.eyJzdWIiOiJ4In0.c2lnbmF0dXJl end\n\
                    -----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n\
                    password=hunter22 and the rest stays";
        let out = redact(text, &secrets);
        for gone in [
            "lab-0123456789abcdef",
            "s3cr3t-value",
            "abcdefghijk",
            "eyJhbGciOi",
            "MHcCAQEE",
            "hunter22",
        ] {
            assert!(!out.contains(gone), "{gone} left in:\n{out}");
        }
        for kept in [
            "dialing with",
            "\"user\":\"dev\"",
            "jwt",
            "and the rest stays",
        ] {
            assert!(out.contains(kept), "{kept} removed:\n{out}");
        }
    }
}
