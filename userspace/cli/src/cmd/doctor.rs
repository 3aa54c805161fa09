//! `tpbpf doctor`.
use std::process::ExitCode;

use crate::Output;

pub fn run(output: Output) -> ExitCode {
    let report = tpbpf_doctor::run();
    match output {
        Output::Table => print!("{report}"),
        Output::Json => println!("{}", report.to_json()),
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
