//! The servers in the lab's pods, from Debian's packages: each pod's
//! sandbox, then dnsmasq (the cluster DNS), nginx, Redis or PostgreSQL;
//! waiting until one answers, and stopping it.
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    blob_bytes,
    netns::in_netns,
    process::{mkdir, run, spawn_detached, stop_pid, write},
    spec::{self, App, Pod},
    Lab, LabError, Result, BLOB_LEN,
};

/// The PATH a container image sets, for a pod's sandbox and its server.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Lab {
    pub(crate) fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.state.join(format!("{}-{}", pod.namespace, pod.name))
    }

    pub(crate) fn pid_file(&self, pod: &Pod) -> PathBuf {
        let dir = self.pod_dir(pod);
        match pod.app {
            App::Postgres => dir.join("data/postmaster.pid"),
            _ => dir.join("server.pid"),
        }
    }

    pub(crate) fn start_app(&self, pod: &Pod) -> Result<()> {
        let dir = self.pod_dir(pod);
        mkdir(&dir)?;
        let ns = self.pod_netns(pod);
        let pid = self.pid_file(pod);
        // The pod's sandbox, as a container runtime's `pause`: the first
        // process of the pod's namespace, with an image's environment
        // (PATH) and none of the pod spec's.
        let mut pause = Command::new("ip");
        pause
            .env_clear()
            .env("PATH", IMAGE_PATH)
            .args(["netns", "exec", &ns, "sleep", "infinity"]);
        let pause_pid = spawn_detached(&mut pause, &dir.join("pause.log"), "the pod's sandbox")?;
        write(&dir.join("pause.pid"), &pause_pid.to_string())?;
        match pod.app {
            App::Dns => {
                let mut args = vec![
                    "netns".to_string(),
                    "exec".into(),
                    ns,
                    "dnsmasq".into(),
                    "--conf-file=/dev/null".into(),
                    "--no-resolv".into(),
                    "--no-hosts".into(),
                    "--bind-interfaces".into(),
                    "--user=root".into(),
                    format!("--listen-address={}", pod.ip),
                    format!("--pid-file={}", pid.display()),
                    format!("--local=/{}/", spec::CLUSTER_DOMAIN),
                    format!("--log-facility={}", dir.join("dns.log").display()),
                ];
                for svc in spec::services() {
                    args.push(format!(
                        "--host-record={}.{}.svc.{},{}",
                        svc.name,
                        svc.namespace,
                        spec::CLUSTER_DOMAIN,
                        svc.cluster_ip
                    ));
                }
                for p in self.pods() {
                    args.push(format!(
                        "--host-record={}.{}.pod.{},{}",
                        p.ip.replace('.', "-"),
                        p.namespace,
                        spec::CLUSTER_DOMAIN,
                        p.ip
                    ));
                }
                run(
                    app_cmd(pod, &args[2]).args(&args[3..]),
                    "is dnsmasq installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Nginx => {
                let tmp = dir.join("tmp");
                mkdir(&tmp)?;
                let blob = dir.join("blob");
                if fs::metadata(&blob).map(|m| m.len()).ok() != Some(BLOB_LEN as u64) {
                    fs::write(&blob, blob_bytes()).map_err(|source| LabError::Io {
                        what: format!("writing {}", blob.display()),
                        source,
                    })?;
                }
                let conf = dir.join("nginx.conf");
                let body = format!(
                    "hello from {} ({} in {}), served by nginx\\n",
                    pod.name, pod.workload, pod.namespace
                );
                write(
                    &conf,
                    &format!(
                        "daemon on;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log {dir}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n access_log {dir}/access.log;\n client_body_temp_path {tmp}/body;\n proxy_temp_path {tmp}/proxy;\n fastcgi_temp_path {tmp}/fastcgi;\n uwsgi_temp_path {tmp}/uwsgi;\n scgi_temp_path {tmp}/scgi;\n server {{\n  listen 80;\n  location = /blob {{ default_type application/octet-stream; alias {dir}/blob; }}\n  location / {{ default_type text/plain; return 200 \"{body}\"; }}\n }}\n}}\n",
                        pid = pid.display(),
                        dir = dir.display(),
                        tmp = tmp.display(),
                    ),
                )?;
                run(
                    app_cmd(pod, &ns).args(["nginx", "-c", &conf.display().to_string()]),
                    "is nginx installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Redis => {
                run(
                    app_cmd(pod, &ns).args([
                        "redis-server",
                        // The pod's address, and loopback, where
                        // port-forwards arrive (as in a container).
                        "--bind",
                        &pod.ip,
                        "127.0.0.1",
                        "--port",
                        "6379",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--protected-mode",
                        "no",
                        "--daemonize",
                        "yes",
                        "--pidfile",
                        &pid.display().to_string(),
                        "--dir",
                        &dir.display().to_string(),
                        "--logfile",
                        &dir.join("redis.log").display().to_string(),
                    ]),
                    "is redis-server installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Postgres => {
                // PostgreSQL refuses to run as root: its files belong to `postgres`.
                for d in [Path::new("/run/tpbpf-lab"), &self.state, &dir] {
                    let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
                }
                let data = dir.join("data");
                let user = pod
                    .env
                    .iter()
                    .find(|(k, _)| *k == "POSTGRES_USER")
                    .map_or("postgres", |(_, v)| *v);
                run(
                    Command::new("chown").args(["postgres:postgres", &dir.display().to_string()]),
                    "the postgresql package creates the postgres user",
                )?;
                run(
                    Command::new("runuser").args([
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("initdb"),
                        "-D",
                        &data.display().to_string(),
                        "-U",
                        user,
                        "--auth=trust",
                        "-E",
                        "UTF8",
                    ]),
                    "is PostgreSQL installed? sudo bash xtask/setup.sh",
                )?;
                // The lab's database trusts the lab's networks, like a dev cluster.
                let hba = data.join("pg_hba.conf");
                let mut text = fs::read_to_string(&hba).map_err(|source| LabError::Io {
                    what: format!("reading {}", hba.display()),
                    source,
                })?;
                text.push_str("host all all 0.0.0.0/0 trust\n");
                write(&hba, &text)?;
                run(
                    app_cmd(pod, &ns).args([
                        "runuser",
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("pg_ctl"),
                        "-D",
                        &data.display().to_string(),
                        "-l",
                        &dir.join("postgres.log").display().to_string(),
                        "-w",
                        "-o",
                        &format!(
                            "-c listen_addresses={},127.0.0.1 -c unix_socket_directories={}",
                            pod.ip,
                            dir.display()
                        ),
                        "start",
                    ]),
                    "see postgres.log in the lab's state directory",
                )?;
                // POSTGRES_DB, as the official image creates it.
                if let Some((_, db)) = pod.env.iter().find(|(k, _)| *k == "POSTGRES_DB") {
                    run(
                        Command::new("runuser").args([
                            "-u",
                            "postgres",
                            "--",
                            &pg_bin("createdb"),
                            "-h",
                            &dir.display().to_string(),
                            "-U",
                            user,
                            db,
                        ]),
                        "see postgres.log in the lab's state directory",
                    )?;
                }
            }
        }
        debug!(pod = pod.name, "started");
        Ok(())
    }

    /// Waits until `pod`'s server answers on its pod address, from its node.
    pub(crate) fn wait_pod(&self, pod: &Pod, deadline: Instant) -> Result<()> {
        let port = match pod.app {
            App::Dns => 53,
            App::Nginx => 80,
            App::Redis => 6379,
            App::Postgres => 5432,
        };
        let addr: SocketAddr = format!("{}:{port}", pod.ip)
            .parse()
            .map_err(|_| LabError::NotReady(pod.ip.clone()))?;
        let node = self.node_netns(pod.node);
        loop {
            if in_netns(&node, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::NotReady(format!(
                    "{} in {} is not answering on {addr}",
                    pod.app_name(),
                    pod.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops a pod's processes: its server, then its sandbox.
    pub(crate) fn stop_pod(&self, pod: &Pod) {
        if pod.app == App::Postgres {
            let data = self.pod_dir(pod).join("data");
            if data.join("postmaster.pid").exists() {
                let _ = Command::new("runuser")
                    .args([
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("pg_ctl"),
                        "-D",
                        &data.display().to_string(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(pid) = fs::read_to_string(self.pid_file(pod))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            stop_pid(pid);
        }
        if let Some(pid) = fs::read_to_string(self.pod_dir(pod).join("pause.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            stop_pid(pid);
        }
    }
}

impl Pod {
    fn app_name(&self) -> &'static str {
        match self.app {
            App::Dns => "dnsmasq",
            App::Nginx => "nginx",
            App::Redis => "redis",
            App::Postgres => "postgres",
        }
    }
}

/// A pod's process: `ip netns exec` into its namespace with the
/// environment a container would have (the pod spec's variables, PATH,
/// HOSTNAME) and nothing of the machine that runs the lab.
fn app_cmd(pod: &Pod, netns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOSTNAME", &pod.name)
        .envs(pod.env.iter().copied())
        .envs(pod.secret_env.iter().map(|s| (s.name, s.value)))
        .args(["netns", "exec", netns]);
    cmd
}

fn pg_bin(name: &str) -> String {
    // Debian keeps the server binaries per major version.
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| name.to_string())
}
