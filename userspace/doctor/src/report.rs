//! The doctor's report: a table for people, JSON for machines.
use std::fmt::{self, Write as _};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but not as well as it could.
    Warn,
    /// A requirement is missing: tpbpf will not work.
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            remedy: None,
        }
    }
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            remedy: Some(remedy.into()),
        }
    }
    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            remedy: Some(remedy.into()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no requirement is missing (warnings allowed).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            ok: bool,
            checks: &'a [Check],
        }
        serde_json::to_string_pretty(&Out {
            ok: self.ok(),
            checks: &self.checks,
        })
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(f, "{:<width$}  {:<6}  DETAIL", "CHECK", "STATUS")?;
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            writeln!(f, "{:<width$}  {:<6}  {}", c.name, status, c.detail)?;
            if let (Some(remedy), true) = (&c.remedy, c.status != Status::Ok) {
                let mut line = String::new();
                let _ = write!(line, "{:<width$}  {:<6}  -> {remedy}", "", "");
                writeln!(f, "{line}")?;
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        if failed == 0 {
            write!(f, "\nall {} requirements met", self.checks.len())?;
            if warned > 0 {
                write!(f, " ({warned} warnings)")?;
            }
            writeln!(f)
        } else {
            writeln!(
                f,
                "\n{failed} of {} requirements missing: see the remedies above",
                self.checks.len()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_fails_the_report_and_shows_its_remedy() {
        let r = Report {
            checks: vec![
                Check::ok("a", "fine"),
                Check::fail("b", "broken", "do the thing"),
            ],
        };
        assert!(!r.ok());
        let text = r.to_string();
        assert!(text.contains("-> do the thing"), "{text}");
        assert!(text.contains("1 of 2 requirements missing"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
    }

    #[test]
    fn warnings_do_not_fail_the_report() {
        let r = Report {
            checks: vec![Check::warn("a", "slow", "tune it")],
        };
        assert!(r.ok());
    }
}
