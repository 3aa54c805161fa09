//! Intercepts by name, each name taken before a request's first await.
use super::*;

/// Intercepts by name. A request takes its name ([`Names::reserve`])
/// before its first await and fills it in once the intercept is in place;
/// the name is freed if the request fails on the way. So two requests
/// with one name cannot both go ahead: the check and the insert are one
/// critical section. Generic over the entry so it is tested without a
/// cluster.
pub(super) struct Names<T> {
    pub(super) slots: Mutex<NameSlots<T>>,
}

pub(super) struct NameSlots<T> {
    pub(super) by_name: HashMap<String, Slot<T>>,
    pub(super) next_ticket: u64,
}

pub(super) enum Slot<T> {
    /// A request is setting it up; the ticket tells its reservation from a
    /// later one of the same name (after `tpbpf down` freed it).
    Reserved(u64),
    Active(T),
}

impl<T> Default for Names<T> {
    fn default() -> Self {
        Names {
            slots: Mutex::new(NameSlots {
                by_name: HashMap::new(),
                next_ticket: 1,
            }),
        }
    }
}

/// A name taken by a request: filled in with [`Reservation::fill`], freed
/// when dropped unfilled.
pub(super) struct Reservation<'a, T> {
    pub(super) names: &'a Names<T>,
    pub(super) name: String,
    pub(super) ticket: u64,
}

impl<T> Names<T> {
    pub(super) fn reserve(&self, name: &str) -> Result<Reservation<'_, T>, String> {
        let mut slots = lock(&self.slots);
        match slots.by_name.get(name) {
            Some(Slot::Active(_)) => Err(format!(
                "an intercept named {name} exists: `tpbpf leave {name}` first, or pick another --name"
            )),
            Some(Slot::Reserved(_)) => Err(format!(
                "an intercept named {name} is being set up by another request: wait for it, or pick another --name"
            )),
            None => {
                let ticket = slots.next_ticket;
                slots.next_ticket += 1;
                slots.by_name.insert(name.to_string(), Slot::Reserved(ticket));
                Ok(Reservation {
                    names: self,
                    name: name.to_string(),
                    ticket,
                })
            }
        }
    }

    /// Takes an intercept out (`leave`); one still being set up stays.
    pub(super) fn remove(&self, name: &str) -> Result<T, String> {
        let mut slots = lock(&self.slots);
        match slots.by_name.remove(name) {
            Some(Slot::Active(t)) => Ok(t),
            Some(reserved @ Slot::Reserved(_)) => {
                slots.by_name.insert(name.to_string(), reserved);
                Err(format!(
                    "the intercept {name} is still being set up: `tpbpf leave {name}` once its `tpbpf intercept` has answered"
                ))
            }
            None => Err(format!(
                "no intercept named {name} (`tpbpf list` shows them)"
            )),
        }
    }

    /// Takes every intercept out, and frees the names being set up (their
    /// requests then fail): `tpbpf down`.
    pub(super) fn drain(&self) -> Vec<T> {
        lock(&self.slots)
            .by_name
            .drain()
            .filter_map(|(_, slot)| match slot {
                Slot::Active(t) => Some(t),
                Slot::Reserved(_) => None,
            })
            .collect()
    }

    /// What `f` makes of each intercept in place, by name.
    pub(super) fn summaries<S>(&self, f: impl Fn(&str, &T) -> S) -> Vec<S> {
        let slots = lock(&self.slots);
        let mut active: Vec<(&String, &T)> = slots
            .by_name
            .iter()
            .filter_map(|(n, slot)| match slot {
                Slot::Active(t) => Some((n, t)),
                Slot::Reserved(_) => None,
            })
            .collect();
        active.sort_by(|a, b| a.0.cmp(b.0));
        active.into_iter().map(|(n, t)| f(n, t)).collect()
    }
}

impl<T> Reservation<'_, T> {
    /// Puts the intercept in place under the name; hands it back if the
    /// name was freed meanwhile (`tpbpf down`), to be dropped.
    pub(super) fn fill(self, value: T) -> Result<(), T> {
        let mut slots = lock(&self.names.slots);
        if !self.holds(&slots) {
            return Err(value);
        }
        slots.by_name.insert(self.name.clone(), Slot::Active(value));
        Ok(())
    }

    /// Whether the name's slot is still this reservation's.
    pub(super) fn holds(&self, slots: &NameSlots<T>) -> bool {
        matches!(slots.by_name.get(&self.name), Some(Slot::Reserved(t)) if *t == self.ticket)
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        let mut slots = lock(&self.names.slots);
        if self.holds(&slots) {
            slots.by_name.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    // The reservation of names.

    /// A request as `Manager::intercept` makes it: the name is taken
    /// first, then the awaits (the workload, its pods, the agents), here a
    /// barrier both requests reach before either goes on, then the entry.
    async fn intercept_with(
        names: Arc<Names<u32>>,
        barrier: Arc<tokio::sync::Barrier>,
        entry: u32,
    ) -> Result<(), String> {
        let reservation = names.reserve("dev");
        barrier.wait().await;
        let reservation = reservation?;
        tokio::task::yield_now().await;
        reservation
            .fill(entry)
            .map_err(|_| "freed meanwhile".to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_requests_with_one_name_at_once_exactly_one_proceeds() {
        for _ in 0..100 {
            let names: Arc<Names<u32>> = Arc::default();
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let a = tokio::spawn(intercept_with(names.clone(), barrier.clone(), 1));
            let b = tokio::spawn(intercept_with(names.clone(), barrier.clone(), 2));
            let results = [a.await.unwrap(), b.await.unwrap()];
            let ok: Vec<usize> = (0..2).filter(|i| results[*i].is_ok()).collect();
            assert_eq!(ok.len(), 1, "{results:?}");
            let refused = results[1 - ok[0]].as_ref().unwrap_err();
            assert!(
                refused.contains("an intercept named dev is being set up by another request"),
                "{refused}"
            );
            // The one that went ahead holds the name, with its entry.
            assert_eq!(names.remove("dev"), Ok(ok[0] as u32 + 1));
        }
    }

    #[test]
    fn a_name_in_place_is_refused_and_a_failed_request_frees_its_name() {
        let names: Names<u32> = Names::default();
        names.reserve("dev").unwrap().fill(1).unwrap();
        let e = names.reserve("dev").err().unwrap();
        assert!(
            e.contains("an intercept named dev exists: `tpbpf leave dev` first"),
            "{e}"
        );
        // A request that fails on the way (its reservation dropped unfilled).
        drop(names.reserve("other").unwrap());
        names.reserve("other").unwrap().fill(2).unwrap();
        assert_eq!(names.remove("dev"), Ok(1));
        assert_eq!(names.remove("other"), Ok(2));
        let e = names.remove("dev").unwrap_err();
        assert!(e.contains("no intercept named dev"), "{e}");
    }

    #[test]
    fn a_name_being_set_up_cannot_be_left_and_is_not_listed() {
        let names: Names<u32> = Names::default();
        let reservation = names.reserve("dev").unwrap();
        let e = names.remove("dev").unwrap_err();
        assert!(e.contains("still being set up"), "{e}");
        assert!(names.summaries(|n, _| n.to_string()).is_empty());
        reservation.fill(7).unwrap();
        assert_eq!(
            names.summaries(|n, e| (n.to_string(), *e)),
            vec![("dev".to_string(), 7)]
        );
    }

    #[test]
    fn an_intercept_ended_by_down_while_set_up_is_handed_back_and_spares_a_newer_one() {
        let names: Names<u32> = Names::default();
        names.reserve("a").unwrap().fill(1).unwrap();
        let old = names.reserve("dev").unwrap();
        // `tpbpf down`: what is in place goes, the name being set up is freed.
        assert_eq!(names.drain(), vec![1]);
        let newer = names.reserve("dev").unwrap();
        // The old request ends: its entry comes back to be dropped, and it
        // takes nothing from the newer one of the same name.
        assert_eq!(old.fill(2), Err(2));
        assert!(names.reserve("dev").is_err());
        newer.fill(3).unwrap();
        assert_eq!(names.remove("dev"), Ok(3));
    }

    #[tokio::test]
    async fn a_request_cut_short_does_not_hold_its_name() {
        // A request that never gets past its awaits (here cut by a timeout,
        // as a client that goes away is) frees its name when dropped.
        let names: Arc<Names<u32>> = Arc::default();
        let n2 = names.clone();
        let stuck = async move {
            let _reservation = n2.reserve("dev")?;
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        };
        assert!(tokio::time::timeout(Duration::from_millis(10), stuck)
            .await
            .is_err());
        assert!(names.reserve("dev").is_ok());
    }
}
