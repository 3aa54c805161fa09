//! Watches: a stream of ADDED, MODIFIED and DELETED events, polled from
//! the lab's state.
use std::{collections::HashMap, time::Duration};

use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};

/// A watch: ADDED events for the current objects (when `initial`), then
/// the changes as they happen (the lab's state is read every 200 ms and
/// compared by uid): ADDED, MODIFIED, DELETED, until the timeout.
pub(super) fn watch(
    items: Vec<Value>,
    initial: bool,
    poll: impl Fn() -> Vec<Value> + Send + 'static,
    timeout_s: u64,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(16);
    let key = |o: &Value| {
        o["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]))
    };
    tokio::spawn(async move {
        let event = |t: &str, o: &Value| format!("{}\n", json!({"type": t, "object": o}));
        let mut known: HashMap<String, Value> = HashMap::new();
        for o in items {
            if initial && tx.send(Ok(event("ADDED", &o))).await.is_err() {
                return;
            }
            known.insert(key(&o), o);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let now: HashMap<String, Value> = poll().into_iter().map(|o| (key(&o), o)).collect();
            let mut events = Vec::new();
            for (k, o) in &known {
                if !now.contains_key(k) {
                    events.push(event("DELETED", o));
                }
            }
            for (k, o) in &now {
                match known.get(k) {
                    None => events.push(event("ADDED", o)),
                    Some(old) if old != o => events.push(event("MODIFIED", o)),
                    Some(_) => {}
                }
            }
            known = now;
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
