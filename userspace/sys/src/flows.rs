//! A bounded table of datagram flows: each flow a queue of datagrams, the
//! number of flows, the datagrams and bytes queued per flow, and the bytes
//! queued in all flows together, all capped. tpbpfd keeps one per proxy
//! socket (by application socket and destination), the user's side one per
//! bridge (by tpbpfd's flow id), with the same bounds.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::sync::mpsc;

/// What a table of flows may hold.
#[derive(Clone, Copy, Debug)]
pub struct FlowBounds {
    /// Flows at once.
    pub flows: usize,
    /// Datagrams queued in one flow.
    pub queue: usize,
    /// Bytes queued in one flow.
    pub flow_bytes: usize,
    /// Bytes queued in all flows together.
    pub total_bytes: usize,
}

struct Entry {
    tx: mpsc::Sender<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
}

pub struct Flows<K> {
    flows: HashMap<K, Entry>,
    bounds: FlowBounds,
    total: Arc<AtomicUsize>,
}

/// What [`Flows::deliver`] did with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for its flow.
    Queued,
    /// Its flow's queue, or all flows' bytes, are full: dropped (datagrams
    /// may be lost).
    Full,
    /// No such flow.
    Unknown,
}

/// The receiving end of one flow's queue: what it takes leaves the bounds.
pub struct FlowRx {
    rx: mpsc::Receiver<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl FlowRx {
    /// The next datagram; `None` once the flow is removed and drained.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let d = self.rx.recv().await?;
        self.taken(d.len());
        Some(d)
    }

    /// The next datagram if one is queued.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let d = self.rx.try_recv().ok()?;
        self.taken(d.len());
        Some(d)
    }

    fn taken(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        self.total.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for FlowRx {
    fn drop(&mut self) {
        // What nobody will read gives its bytes back to the other flows.
        self.rx.close();
        while self.try_recv().is_some() {}
    }
}

impl<K: Hash + Eq> Flows<K> {
    pub fn new(bounds: FlowBounds) -> Self {
        Self {
            flows: HashMap::new(),
            bounds,
            total: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A new flow's queue; `None` when there are `max` flows already or
    /// `key` has one.
    pub fn open(&mut self, key: K) -> Option<FlowRx> {
        if self.flows.len() >= self.bounds.flows || self.flows.contains_key(&key) {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.bounds.queue);
        let bytes = Arc::new(AtomicUsize::new(0));
        self.flows.insert(
            key,
            Entry {
                tx,
                bytes: bytes.clone(),
            },
        );
        Some(FlowRx {
            rx,
            bytes,
            total: self.total.clone(),
        })
    }

    /// Queues a datagram for the flow of `key`, never waiting.
    pub fn deliver(&self, key: &K, datagram: Vec<u8>) -> Delivery {
        let Some(e) = self.flows.get(key) else {
            return Delivery::Unknown;
        };
        let n = datagram.len();
        if e.bytes.load(Ordering::Relaxed) + n > self.bounds.flow_bytes
            || self.total.load(Ordering::Relaxed) + n > self.bounds.total_bytes
        {
            return Delivery::Full;
        }
        // Counted before it is queued, so the reader never subtracts first.
        e.bytes.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
        match e.tx.try_send(datagram) {
            Ok(()) => Delivery::Queued,
            // Full, or the flow's task ended (its removal is on the way).
            Err(_) => {
                e.bytes.fetch_sub(n, Ordering::Relaxed);
                self.total.fetch_sub(n, Ordering::Relaxed);
                Delivery::Full
            }
        }
    }

    /// Bytes queued in all flows.
    pub fn queued_bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.flows.contains_key(key)
    }

    pub fn remove(&mut self, key: &K) {
        self.flows.remove(key);
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn max(&self) -> usize {
        self.bounds.flows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(flows: usize, queue: usize) -> FlowBounds {
        FlowBounds {
            flows,
            queue,
            flow_bytes: 1 << 20,
            total_bytes: 4 << 20,
        }
    }

    #[test]
    fn the_table_is_bounded_and_refuses_duplicates() {
        let mut flows = Flows::new(bounds(8, 4));
        let mut queues = Vec::new();
        for id in 0..8u32 {
            queues.push(flows.open(id).expect("room for the flow"));
        }
        assert!(flows.open(8).is_none(), "one flow too many");
        flows.remove(&3);
        assert!(flows.open(2).is_none(), "a duplicate key");
        assert!(flows.open(3).is_some(), "a key is free again once removed");
        assert_eq!(flows.len(), 8);
    }

    #[test]
    fn a_flow_queues_at_most_its_bound_and_unknown_flows_are_said_so() {
        let mut flows = Flows::new(bounds(8, 4));
        let mut rx = flows.open(1u32).unwrap();
        let got: Vec<Delivery> = (0..6).map(|i| flows.deliver(&1, vec![i])).collect();
        assert_eq!(
            &got[..4],
            &[
                Delivery::Queued,
                Delivery::Queued,
                Delivery::Queued,
                Delivery::Queued
            ]
        );
        assert_eq!(&got[4..], &[Delivery::Full, Delivery::Full]);
        assert_eq!(flows.deliver(&2, vec![0]), Delivery::Unknown);
        let mut n = 0;
        while let Some(d) = rx.try_recv() {
            assert_eq!(d, vec![n]);
            n += 1;
        }
        assert_eq!(n, 4, "the first four, in order");
        drop(rx);
        assert_eq!(
            flows.deliver(&1, vec![0]),
            Delivery::Full,
            "a flow whose task ended"
        );
    }

    #[test]
    fn bytes_are_bounded_per_flow_and_in_all_flows_and_come_back_when_read() {
        let mut flows = Flows::new(FlowBounds {
            flows: 8,
            queue: 100,
            flow_bytes: 3000,
            total_bytes: 5000,
        });
        let mut a = flows.open(1u32).unwrap();
        let b = flows.open(2u32).unwrap();
        // Flow 1: two of 1400 fit its 3000 bytes, the third does not.
        assert_eq!(flows.deliver(&1, vec![1; 1400]), Delivery::Queued);
        assert_eq!(flows.deliver(&1, vec![1; 1400]), Delivery::Queued);
        assert_eq!(flows.deliver(&1, vec![1; 1400]), Delivery::Full);
        // Flow 2: 2200 bytes left of the 5000 in all.
        assert_eq!(flows.deliver(&2, vec![2; 1400]), Delivery::Queued);
        assert_eq!(flows.deliver(&2, vec![2; 1400]), Delivery::Full);
        assert_eq!(flows.queued_bytes(), 4200);
        // Reading gives the bytes back.
        assert_eq!(a.try_recv().map(|d| d.len()), Some(1400));
        assert_eq!(flows.deliver(&2, vec![2; 1400]), Delivery::Queued);
        // A reader that goes away returns what it never read.
        drop(b);
        assert_eq!(flows.queued_bytes(), 1400);
        assert_eq!(flows.deliver(&2, vec![2; 1]), Delivery::Full);
    }
}
