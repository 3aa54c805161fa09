//! A bounded table of datagram flows: each flow a queue of datagrams, the
//! number of flows and the datagrams queued per flow both capped. tpbpfd
//! keeps one per proxy socket (by application socket and destination), the
//! user's side one per bridge (by tpbpfd's flow id), with the same bounds.
use std::{collections::HashMap, hash::Hash};

use tokio::sync::mpsc;

pub struct Flows<K> {
    flows: HashMap<K, mpsc::Sender<Vec<u8>>>,
    max: usize,
    queue: usize,
}

/// What [`Flows::deliver`] did with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for its flow.
    Queued,
    /// Its flow's queue is full: dropped (datagrams may be lost).
    Full,
    /// No such flow.
    Unknown,
}

impl<K: Hash + Eq> Flows<K> {
    /// At most `max` flows, `queue` datagrams queued in each.
    pub fn new(max: usize, queue: usize) -> Self {
        Self {
            flows: HashMap::new(),
            max,
            queue,
        }
    }

    /// A new flow's queue; `None` when there are `max` flows already or
    /// `key` has one.
    pub fn open(&mut self, key: K) -> Option<mpsc::Receiver<Vec<u8>>> {
        if self.flows.len() >= self.max || self.flows.contains_key(&key) {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.queue);
        self.flows.insert(key, tx);
        Some(rx)
    }

    /// Queues a datagram for the flow of `key`, never waiting.
    pub fn deliver(&self, key: &K, datagram: Vec<u8>) -> Delivery {
        match self.flows.get(key) {
            None => Delivery::Unknown,
            Some(tx) => match tx.try_send(datagram) {
                Ok(()) => Delivery::Queued,
                Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
                // The flow's task ended; its removal is on the way.
                Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Full,
            },
        }
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
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_bounded_and_refuses_duplicates() {
        let mut flows = Flows::new(8, 4);
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
        let mut flows = Flows::new(8, 4);
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
        while let Ok(d) = rx.try_recv() {
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
}
