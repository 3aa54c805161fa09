//! Writes deploy/helm/tpbpf from the objects `tpbpf install` applies
//! (`cargo xtask chart`).
fn main() -> std::process::ExitCode {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/tpbpf");
    for (path, content) in tpbpf_deploy::helm_chart() {
        let file = dir.join(path);
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&file, content));
        if let Err(e) = written {
            eprintln!("render-chart: writing {}: {e}", file.display());
            return std::process::ExitCode::FAILURE;
        }
        println!("wrote {}", file.display());
    }
    std::process::ExitCode::SUCCESS
}
