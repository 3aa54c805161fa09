//! `tpbpf doctor`.
use std::process::ExitCode;

use crate::Output;

pub fn run(output: Output) -> ExitCode {
    let report = tpbpf_doctor::run();
    match output {
        Output::Table => print!("{report}"),
        Output::Json => println!("{}", report.to_json()),
        Output::Yaml => match serde_json::from_str(&report.to_json()) {
            Ok(v) => print!("{}", Output::Yaml.render(&v)),
            Err(e) => eprintln!("tpbpf: doctor's report is not JSON: {e}"),
        },
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
