//! Progress on long steps (`up`, `install`, `intercept`, `lab up`): on a
//! terminal, a spinner with the current step and its time on stderr; in a
//! log (stderr not a terminal), one plain line per step; the time each took
//! at the end. With `-o json|yaml` and no terminal nothing is printed: the
//! steps and their times go into the command's JSON ([`Progress::steps`]).
use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::Output;

enum Sink {
    Spinner(ProgressBar),
    Lines,
    Quiet,
}

pub struct Progress {
    what: &'static str,
    sink: Sink,
    started: Instant,
    current: Option<(String, Instant)>,
    done: Vec<(String, Duration)>,
}

impl Progress {
    /// Progress for command `what` (`up`, `install`, ...), shown as
    /// `output` and stderr allow.
    pub fn new(what: &'static str, output: Output) -> Self {
        let sink = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(100));
            Sink::Spinner(bar)
        } else if output == Output::Table {
            Sink::Lines
        } else {
            Sink::Quiet
        };
        Self {
            what,
            sink,
            started: Instant::now(),
            current: None,
            done: Vec::new(),
        }
    }

    /// Ends the current step (if any) and starts `step`.
    pub fn step(&mut self, step: impl Into<String>) {
        self.end_step();
        let step = step.into();
        match &self.sink {
            Sink::Spinner(bar) => {
                bar.reset_elapsed();
                bar.set_message(step.clone());
            }
            Sink::Lines => eprintln!("tpbpf {}: {step}", self.what),
            Sink::Quiet => {}
        }
        self.current = Some((step, Instant::now()));
    }

    fn end_step(&mut self) {
        if let Some((step, at)) = self.current.take() {
            self.done.push((step, at.elapsed()));
        }
    }

    /// Lets a line go to stderr without the spinner drawing over it.
    pub fn println(&self, line: &str) {
        match &self.sink {
            Sink::Spinner(bar) => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    /// Prints a line of the command's report (stdout) without the
    /// spinner drawing over it.
    pub fn say(&self, line: &str) {
        match &self.sink {
            Sink::Spinner(bar) => bar.suspend(|| println!("{line}")),
            _ => println!("{line}"),
        }
    }

    /// The steps so far with their times, for a command's JSON.
    pub fn steps(&mut self) -> Value {
        self.end_step();
        Value::Array(
            self.done
                .iter()
                .map(|(s, d)| json!({"step": s, "seconds": (d.as_secs_f64() * 1000.0).round() / 1000.0}))
                .collect(),
        )
    }

    /// Ends the last step and says how long each took (on a terminal or in
    /// a log).
    pub fn finish(mut self) {
        self.end_step();
        if self.done.is_empty() {
            return;
        }
        let summary = format!(
            "tpbpf {}: done in {}: {}",
            self.what,
            seconds(self.started.elapsed()),
            self.done
                .iter()
                .map(|(s, d)| format!("{s} {}", seconds(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match &self.sink {
            Sink::Spinner(bar) => {
                bar.finish_and_clear();
                eprintln!("{summary}");
            }
            Sink::Lines => eprintln!("{summary}"),
            Sink::Quiet => {}
        }
    }

    /// Clears the spinner without a summary (the command failed; its error
    /// says what).
    pub fn abandon(&self) {
        if let Sink::Spinner(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.abandon();
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
