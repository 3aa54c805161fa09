//! The lab's nodes doing what a kubelet does for tpbpf's DaemonSet: while
//! `tpbpf-system/tpbpf-agent` is applied, every node runs its container
//! (under runc with the container's security context where runc is
//! installed, else as a process), runs its readiness and liveness probes,
//! and keeps the pod's status (Ready, restarts, why it waits) in the lab's
//! state, where the API reads it. A container that exits is started again
//! after a back-off (CrashLoopBackOff) and counted in `restartCount`; one
//! whose liveness probe fails is killed and started again; a DaemonSet
//! change replaces the pods (a rolling update); when it is deleted, the
//! agents stop.
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use tpbpf_lab::{
    agent::{now_s, pod_name, AgentPodState, AgentProcess, ContainerSpec, Terminated, Waiting},
    alive, spec, Lab,
};
use tracing::{info, warn};

use crate::{objects::AGENT_NAMESPACE, probe::Probe, store::Store};

/// The first wait before a crashed container starts again, doubled on each
/// crash up to [`BACKOFF_MAX`] (Kubernetes: 10 s to 5 min; shorter here so
/// the lab's tests see a restart in seconds).
const BACKOFF_START: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(20);
/// A container that ran this long starts its next back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Until a just-started container's readiness probe first passes, it is
/// probed this often (at most its periodSeconds): the lab does not make a
/// listener that is up in milliseconds wait a whole period.
const FIRST_PROBES: Duration = Duration::from_secs(1);
/// How often the kubelet looks at its pods.
const TICK: Duration = Duration::from_millis(200);

/// One probe's counters.
#[derive(Default)]
struct Track {
    next: Option<Instant>,
    successes: u32,
    failures: u32,
    passed_once: bool,
}

impl Track {
    fn started(at: Instant, probe: Option<&Probe>) -> Self {
        Track {
            next: probe.map(|p| at + p.initial_delay),
            ..Default::default()
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|n| now >= n)
    }
}

/// The agent pod on one node.
struct NodeAgent {
    /// The DaemonSet's resourceVersion this pod was made from.
    generation: String,
    proc: Option<AgentProcess>,
    pid: Option<i32>,
    /// When the running container started.
    started: Option<(Instant, u64)>,
    next_start: Instant,
    backoff: Duration,
    readiness: Track,
    liveness: Track,
    /// Why the kubelet killed the running container (a liveness failure).
    killed_for: Option<String>,
    state: AgentPodState,
    written: Option<AgentPodState>,
}

impl NodeAgent {
    /// A new pod (`version`: the last resourceVersion of the one before).
    fn new(generation: String, lab: &Lab, image: &str, version: u64) -> Self {
        let now = now_s();
        NodeAgent {
            generation: generation.clone(),
            proc: None,
            pid: None,
            started: None,
            next_start: Instant::now(),
            backoff: BACKOFF_START,
            readiness: Track::default(),
            liveness: Track::default(),
            killed_for: None,
            state: AgentPodState {
                version,
                created_at: now,
                generation,
                image: image.to_string(),
                runtime: lab.agent_runtime(),
                ready_changed_at: now,
                waiting: Some(Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                }),
                ..Default::default()
            },
            written: None,
        }
    }

    fn set_ready(&mut self, ready: bool) {
        if self.state.ready != ready {
            self.state.ready = ready;
            self.state.ready_changed_at = now_s();
        }
    }

    /// Stops its container and waits for it (the DaemonSet changed or is
    /// gone).
    fn stop(&mut self, lab: &Lab, node: &str) {
        lab.stop_agent(node);
        if let Some(mut p) = self.proc.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(p.child.try_wait(), Ok(Some(_)) | Err(_)) {
                if Instant::now() > deadline {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.pid = None;
        self.started = None;
    }
}

pub async fn run(lab: String, agent: Option<PathBuf>) {
    let Some(agent) = agent else {
        return;
    };
    let l = Lab::new(&lab).with_agent(agent);
    let store = Store::new(&lab);
    let mut pods: HashMap<&'static str, NodeAgent> = HashMap::new();
    loop {
        let ds = store.get(
            "daemonsets",
            Some(AGENT_NAMESPACE),
            tpbpf_agent_api::DAEMONSET,
        );
        for node in spec::nodes() {
            let entry = pods.remove(node.name);
            let l = l.clone();
            let ds = ds.clone();
            let name = node.name;
            let stepped = tokio::task::spawn_blocking(move || match ds {
                Some(d) => Some(step(&l, &node, &d, entry)),
                None => {
                    if let Some(mut e) = entry {
                        info!(
                            node = node.name,
                            "the agent DaemonSet is gone: stopping the agent"
                        );
                        e.stop(&l, node.name);
                    } else if l.agent_running(node.name) {
                        l.stop_agent(node.name);
                    }
                    if l.agent_state(node.name).is_some() {
                        l.remove_agent_state(node.name);
                    }
                    None
                }
            })
            .await;
            match stepped {
                Ok(Some(e)) => {
                    pods.insert(name, e);
                }
                Ok(None) => {}
                Err(e) => warn!(node = name, "the kubelet's step: {e}"),
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// One look at the agent pod on `node` for DaemonSet `ds`: notices an
/// exit, starts the container when due, runs the probes that are due, and
/// writes the pod's state when it changed.
fn step(lab: &Lab, node: &spec::Node, ds: &Value, entry: Option<NodeAgent>) -> NodeAgent {
    let generation = ds["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let template = &ds["spec"]["template"];
    let container = &template["spec"]["containers"][0];
    let image = container["image"].as_str().unwrap_or_default();
    let mut e = match entry {
        Some(e) if e.generation == generation => e,
        Some(mut old) => {
            info!(
                node = node.name,
                "the agent DaemonSet changed: replacing the agent's pod"
            );
            old.stop(lab, node.name);
            let mut e = NodeAgent::new(generation, lab, image, old.state.version);
            // The replacement is new: written even if it looks the same.
            e.written = None;
            e
        }
        None => {
            // This kubelet is new (the lab's API process started): it
            // adopts what runs, with the pod's counts so far.
            let mut e = NodeAgent::new(generation.clone(), lab, image, 0);
            if let Some(prev) = lab.agent_state(node.name) {
                e.state = prev;
                e.state.generation = generation;
            }
            if let Some(pid) = lab
                .agent_running(node.name)
                .then(|| lab.agent_pid(node.name))
            {
                e.pid = pid;
                e.started = Some((Instant::now(), now_s()));
                e.readiness = Track::started(Instant::now(), None);
                e.readiness.next = Some(Instant::now());
            }
            e
        }
    };
    let readiness = Probe::from_json(&container["readinessProbe"]);
    let liveness = Probe::from_json(&container["livenessProbe"]);
    let ports = &container["ports"];
    let now = Instant::now();

    // Did the container exit?
    if let Some(pid) = e.pid {
        let exited = match &mut e.proc {
            Some(p) => match p.child.try_wait() {
                Ok(Some(st)) => Some(exit_code(st)),
                Ok(None) => None,
                Err(_) => Some(-1),
            },
            None => (!alive(pid)).then_some(-1),
        };
        if let Some(code) = exited {
            on_exit(lab, node, &mut e, code);
        }
    }

    // Start it when due.
    if e.pid.is_none() && now >= e.next_start {
        match ContainerSpec::from_template(template, node) {
            Err(m) => {
                e.state.waiting = Some(Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: m,
                });
                e.next_start = now + e.backoff;
            }
            Ok(spec) => match lab.start_agent(node, &spec) {
                Ok(p) => {
                    info!(
                        node = node.name,
                        pid = p.pid,
                        runtime = lab.agent_runtime().as_str(),
                        "agent started"
                    );
                    if e.state.ever_started {
                        e.state.restart_count += 1;
                    }
                    e.state.ever_started = true;
                    e.pid = Some(p.pid as i32);
                    e.proc = Some(p);
                    let at = Instant::now();
                    e.started = Some((at, now_s()));
                    e.state.started_at = Some(now_s());
                    e.state.waiting = None;
                    e.readiness = Track::started(at, readiness.as_ref());
                    e.liveness = Track::started(at, liveness.as_ref());
                }
                Err(err) => {
                    warn!(node = node.name, "starting the agent: {err}");
                    e.state.waiting = Some(Waiting {
                        reason: "RunContainerError".into(),
                        message: err.to_string(),
                    });
                    e.next_start = now + e.backoff;
                    e.backoff = (e.backoff * 2).min(BACKOFF_MAX);
                }
            },
        }
    }

    // Its probes.
    if e.pid.is_some() {
        match &readiness {
            // No readiness probe: ready while it runs.
            None => e.set_ready(true),
            Some(p) if e.readiness.due(Instant::now()) => {
                let result = p.run(lab, node, ports);
                let t = &mut e.readiness;
                t.next = Some(
                    Instant::now()
                        + if t.passed_once {
                            p.period
                        } else {
                            FIRST_PROBES.min(p.period)
                        },
                );
                match result {
                    Ok(()) => {
                        t.successes += 1;
                        t.failures = 0;
                        t.passed_once = true;
                        if t.successes >= p.success_threshold {
                            e.set_ready(true);
                            e.state.probe_failure = None;
                        }
                    }
                    Err(m) => {
                        t.failures += 1;
                        t.successes = 0;
                        let failures = t.failures;
                        e.state.probe_failure = Some(format!("Readiness probe failed: {m}"));
                        if failures >= p.failure_threshold {
                            e.set_ready(false);
                        }
                    }
                }
            }
            Some(_) => {}
        }
        if let Some(p) = liveness.as_ref().filter(|_| e.liveness.due(Instant::now())) {
            let result = p.run(lab, node, ports);
            let t = &mut e.liveness;
            t.next = Some(Instant::now() + p.period);
            match result {
                Ok(()) => t.failures = 0,
                Err(m) => {
                    t.failures += 1;
                    if t.failures >= p.failure_threshold {
                        warn!(
                            node = node.name,
                            "liveness probe failed: {m}: restarting the agent"
                        );
                        e.killed_for = Some(format!("Liveness probe failed: {m}"));
                        lab.stop_agent(node.name);
                    }
                }
            }
        }
    }

    // Write it down when it changed.
    let changed = match &e.written {
        None => true,
        Some(w) => {
            let mut now = e.state.clone();
            now.version = w.version;
            now != *w
        }
    };
    if changed {
        e.state.version += 1;
        match lab.set_agent_state(node.name, &e.state) {
            Ok(()) => e.written = Some(e.state.clone()),
            Err(err) => warn!(node = node.name, "{err}"),
        }
    }
    e
}

/// The container on `node` exited with `code`: its last state, not ready,
/// and a back-off before it starts again.
fn on_exit(lab: &Lab, node: &spec::Node, e: &mut NodeAgent, code: i32) {
    let (ran, started_at) = e
        .started
        .map_or((Duration::ZERO, now_s()), |(at, s)| (at.elapsed(), s));
    let killed_for = e.killed_for.take();
    let tail = lab.agent_log_tail(node.name);
    let last_line = tail.lines().last().unwrap_or_default().to_string();
    warn!(node = node.name, code, "the agent exited: {last_line}");
    e.state.last_terminated = Some(Terminated {
        exit_code: code,
        reason: if code == 0 { "Completed" } else { "Error" }.into(),
        message: killed_for.unwrap_or(last_line),
        started_at,
        finished_at: now_s(),
    });
    if ran >= BACKOFF_RESET {
        e.backoff = BACKOFF_START;
    }
    e.state.waiting = Some(Waiting {
        reason: "CrashLoopBackOff".into(),
        message: format!(
            "back-off {}s restarting failed container={} pod={}_{}({})",
            e.backoff.as_secs(),
            "agent",
            pod_name(node.name),
            AGENT_NAMESPACE,
            e.state.created_at
        ),
    });
    e.next_start = Instant::now() + e.backoff;
    e.backoff = (e.backoff * 2).min(BACKOFF_MAX);
    e.set_ready(false);
    e.state.started_at = None;
    e.proc = None;
    e.pid = None;
    e.started = None;
    lab.forget_agent(node.name);
}

/// An exit status as the kubelet reports it: the code, or 128 + signal.
fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}
