//! Objects applied to the lab (what `tpbpf install` sends): kept as JSON
//! files in the lab's state directory, one per object, so they outlive the
//! API process and the lab's controller sees them. Only the kinds an
//! install applies are writable; everything else of the lab is read-only.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The kinds the lab accepts writes of: (plural, namespaced).
pub const WRITABLE: &[(&str, bool)] = &[
    ("namespaces", false),
    ("serviceaccounts", true),
    ("clusterroles", false),
    ("roles", true),
    ("clusterrolebindings", false),
    ("rolebindings", true),
    ("daemonsets", true),
];

/// The most objects the store keeps, and the largest one: the lab's API
/// is reachable from the developer machine.
const MAX_OBJECTS: usize = 256;
const MAX_OBJECT_BYTES: usize = 256 * 1024;

pub struct Store {
    dir: PathBuf,
}

fn safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with('.')
}

impl Store {
    pub fn new(lab: &str) -> Store {
        Store {
            dir: Path::new("/run/tpbpf-lab").join(lab).join("applied"),
        }
    }

    fn path(&self, plural: &str, ns: Option<&str>, name: &str) -> PathBuf {
        self.dir
            .join(plural)
            .join(ns.unwrap_or("_"))
            .join(format!("{name}.json"))
    }

    /// Every stored object of `plural`.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let Ok(namespaces) = fs::read_dir(self.dir.join(plural)) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Ok(files) = fs::read_dir(ns.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Some(v) = fs::read(f.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    out.push(v);
                }
            }
        }
        out
    }

    pub fn get(&self, plural: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let b = fs::read(self.path(plural, ns, name)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Creates or replaces `name` with `body` (server-side apply, as far as
    /// one field manager goes): the object is what was applied, with the
    /// server's metadata.
    pub fn apply(
        &self,
        plural: &str,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
    ) -> Result<Value, String> {
        if !safe(name) || ns.is_some_and(|n| !safe(n)) {
            return Err(format!("invalid name {name:?}"));
        }
        if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err("metadata.name does not match the name in the path".into());
        }
        let path = self.path(plural, ns, name);
        let old = self.get(plural, ns, name);
        if old.is_none() && self.count() >= MAX_OBJECTS {
            return Err(format!(
                "the lab keeps {MAX_OBJECTS} applied objects at most"
            ));
        }
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap_or_else(|| {
                crate::objects::uid(body["kind"].as_str().unwrap_or(""), ns.unwrap_or(""), name)
            });
        let version = old
            .as_ref()
            .and_then(|o| {
                o["metadata"]["resourceVersion"]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            + 1;
        body["metadata"]["name"] = json!(name);
        if let Some(ns) = ns {
            body["metadata"]["namespace"] = json!(ns);
        }
        body["metadata"]["uid"] = json!(uid);
        body["metadata"]["resourceVersion"] = json!(version.to_string());
        body["metadata"]["generation"] = json!(version);
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_OBJECT_BYTES {
            return Err(format!("an object of {} bytes is too large", bytes.len()));
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
        fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(body)
    }

    /// Removes `name`; `None` if it was not there.
    pub fn delete(&self, plural: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        if !safe(name) || ns.is_some_and(|n| !safe(n)) {
            return None;
        }
        let old = self.get(plural, ns, name)?;
        fs::remove_file(self.path(plural, ns, name)).ok()?;
        Some(old)
    }

    fn count(&self) -> usize {
        WRITABLE.iter().map(|(p, _)| self.list(p).len()).sum()
    }
}
