//! The order of deliveries: each entity's events go out one at a time, in topic order, while
//! other entities go on (a failing entity waits alone); at most `max_in_flight` requests run at
//! once and at most `max_queued` events are held. Offsets are committable only up to the first
//! event not yet delivered or dead-lettered, so a crash delivers again (same `webhook-id`) and
//! never skips.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// An input partition of the subscription.
pub type Partition = (String, i32);

/// An event taken from Kafka, waiting for its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued<T> {
    pub partition: Partition,
    pub offset: i64,
    /// The entity whose events must stay in order (the record key).
    pub entity: String,
    pub item: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The head may be sent (again) from this Unix ms on.
    WaitingUntil(i64),
    InFlight,
}

#[derive(Debug)]
struct EntityQueue<T> {
    events: VecDeque<Queued<T>>,
    head: Head,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Offsets taken and not finished.
    unfinished: BTreeSet<i64>,
    /// The offset after the last one taken.
    next: i64,
}

/// Deliveries waiting, running and finished, by entity and by partition.
#[derive(Debug)]
pub struct Schedule<T> {
    entities: HashMap<String, EntityQueue<T>>,
    partitions: HashMap<Partition, PartitionProgress>,
    in_flight: usize,
    queued: usize,
    max_in_flight: usize,
    max_queued: usize,
}

impl<T: Clone> Schedule<T> {
    pub fn new(max_in_flight: usize, max_queued: usize) -> Schedule<T> {
        Schedule {
            entities: HashMap::new(),
            partitions: HashMap::new(),
            in_flight: 0,
            queued: 0,
            max_in_flight: max_in_flight.max(1),
            max_queued: max_queued.max(1),
        }
    }

    /// Whether more events may be taken from Kafka (memory stays bounded: the consumer
    /// pauses while this is false).
    pub fn has_room(&self) -> bool {
        self.queued < self.max_queued
    }

    /// Events held (waiting or in flight).
    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Takes an event, behind its entity's earlier ones.
    pub fn push(&mut self, event: Queued<T>) {
        let progress = self.partitions.entry(event.partition.clone()).or_default();
        progress.unfinished.insert(event.offset);
        progress.next = progress.next.max(event.offset + 1);
        self.queued += 1;
        self.entities
            .entry(event.entity.clone())
            .or_insert_with(|| EntityQueue {
                events: VecDeque::new(),
                head: Head::WaitingUntil(i64::MIN),
            })
            .events
            .push_back(event);
    }

    /// An event that needs no delivery (not of the subscription's types): its offset is
    /// finished as soon as the events before it are.
    pub fn pass(&mut self, partition: Partition, offset: i64) {
        let progress = self.partitions.entry(partition).or_default();
        progress.next = progress.next.max(offset + 1);
    }

    /// Whether the entity's head is still this event (not dropped with its partition while
    /// its attempt ran).
    pub fn head_is(&self, entity: &str, partition: &Partition, offset: i64) -> bool {
        self.entities
            .get(entity)
            .and_then(|queue| queue.events.front())
            .is_some_and(|head| &head.partition == partition && head.offset == offset)
    }

    /// Replaces the entity's head's item (its attempt count after a failure).
    pub fn update_head(&mut self, entity: &str, item: T) {
        if let Some(head) = self
            .entities
            .get_mut(entity)
            .and_then(|queue| queue.events.front_mut())
        {
            head.item = item;
        }
    }

    /// The heads that may be sent at `now_ms`, marked in flight: at most one per entity and
    /// `max_in_flight` in all.
    pub fn take_ready(&mut self, now_ms: i64) -> Vec<Queued<T>> {
        let mut ready = Vec::new();
        for queue in self.entities.values_mut() {
            if self.in_flight >= self.max_in_flight {
                break;
            }
            if let Head::WaitingUntil(at) = queue.head
                && at <= now_ms
                && let Some(head) = queue.events.front()
            {
                queue.head = Head::InFlight;
                self.in_flight += 1;
                ready.push(head.clone());
            }
        }
        // Oldest first, so that a partition's committable offset moves as early as it can.
        ready.sort_by_key(|event| event.offset);
        ready
    }

    /// The entity's head was delivered or dead-lettered: its next event may go.
    pub fn finished(&mut self, entity: &str) {
        let Some(queue) = self.entities.get_mut(entity) else {
            return;
        };
        if queue.head == Head::InFlight {
            self.in_flight -= 1;
        }
        if let Some(done) = queue.events.pop_front() {
            self.queued -= 1;
            if let Some(progress) = self.partitions.get_mut(&done.partition) {
                progress.unfinished.remove(&done.offset);
            }
        }
        if queue.events.is_empty() {
            self.entities.remove(entity);
        } else {
            queue.head = Head::WaitingUntil(i64::MIN);
        }
    }

    /// The entity's head failed and is tried again from `at_ms`; the entity's later events
    /// wait behind it.
    pub fn retry_at(&mut self, entity: &str, at_ms: i64) {
        if let Some(queue) = self.entities.get_mut(entity) {
            if queue.head == Head::InFlight {
                self.in_flight -= 1;
            }
            queue.head = Head::WaitingUntil(at_ms);
        }
    }

    /// Heads waiting for a retry.
    pub fn waiting_retries(&self) -> usize {
        self.entities
            .values()
            .filter(|queue| matches!(queue.head, Head::WaitingUntil(at) if at > i64::MIN))
            .count()
    }

    /// When the earliest waiting retry falls due, if any head waits for one.
    pub fn next_due(&self) -> Option<i64> {
        self.entities
            .values()
            .filter_map(|queue| match queue.head {
                Head::WaitingUntil(at) if at > i64::MIN => Some(at),
                _ => None,
            })
            .min()
    }

    /// Per partition, the offset a commit may name: the first event not finished, or the one
    /// after the last taken when all are.
    pub fn committable(&self) -> Vec<(Partition, i64)> {
        let mut offsets: Vec<(Partition, i64)> = self
            .partitions
            .iter()
            .map(|(partition, progress)| {
                let offset = progress
                    .unfinished
                    .first()
                    .copied()
                    .unwrap_or(progress.next);
                (partition.clone(), offset)
            })
            .collect();
        offsets.sort();
        offsets
    }

    /// Forgets a revoked partition's events: another instance delivers them from the
    /// committed offset.
    pub fn revoke(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
        let mut emptied = Vec::new();
        for (entity, queue) in &mut self.entities {
            let before = queue.events.len();
            let head_was_ours = queue
                .events
                .front()
                .is_some_and(|head| &head.partition == partition);
            queue.events.retain(|event| &event.partition != partition);
            self.queued -= before - queue.events.len();
            if head_was_ours {
                if queue.head == Head::InFlight {
                    self.in_flight -= 1;
                }
                queue.head = Head::WaitingUntil(i64::MIN);
            }
            if queue.events.is_empty() {
                emptied.push(entity.clone());
            }
        }
        for entity in emptied {
            self.entities.remove(&entity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(partition: i32, offset: i64, entity: &str) -> Queued<()> {
        Queued {
            partition: ("events".to_owned(), partition),
            offset,
            entity: entity.to_owned(),
            item: (),
        }
    }

    fn offsets(events: &[Queued<()>]) -> Vec<i64> {
        events.iter().map(|event| event.offset).collect()
    }

    /// One event per entity at a time, in order; other entities go on while one retries; the
    /// committable offset stops at the first unfinished event.
    #[test]
    fn entities_keep_their_order_without_blocking_each_other() {
        let mut schedule = Schedule::new(10, 100);
        for (offset, entity) in ["a", "b", "a", "c", "b"].iter().enumerate() {
            schedule.push(event(0, offset as i64, entity));
        }
        assert_eq!(offsets(&schedule.take_ready(0)), [0, 1, 3]);
        assert!(schedule.take_ready(0).is_empty(), "heads are in flight");
        schedule.retry_at("a", 1_000);
        schedule.finished("b");
        schedule.finished("c");
        assert_eq!(offsets(&schedule.take_ready(10)), [4], "b's next; a waits");
        assert_eq!(schedule.next_due(), Some(1_000));
        schedule.finished("b");
        assert_eq!(schedule.committable(), [(("events".to_owned(), 0), 0)]);
        assert_eq!(offsets(&schedule.take_ready(1_000)), [0]);
        schedule.finished("a");
        assert_eq!(schedule.committable(), [(("events".to_owned(), 0), 2)]);
        assert_eq!(offsets(&schedule.take_ready(1_000)), [2]);
        schedule.finished("a");
        assert_eq!(schedule.committable(), [(("events".to_owned(), 0), 5)]);
        assert!(schedule.is_empty());
    }

    /// At most `max_in_flight` requests and `max_queued` events.
    #[test]
    fn in_flight_and_queued_are_bounded() {
        let mut schedule = Schedule::new(2, 3);
        for offset in 0..3 {
            schedule.push(event(0, offset, &format!("e{offset}")));
        }
        assert!(!schedule.has_room());
        let first = schedule.take_ready(0);
        assert_eq!(first.len(), 2);
        schedule.finished(&first[0].entity);
        assert!(schedule.has_room());
        let rest = schedule.take_ready(0);
        assert_eq!(rest.len(), 1);
        assert!(first.iter().all(|taken| taken.entity != rest[0].entity));
    }

    /// A revoked partition's events are dropped, in flight or not, and its entity's events of
    /// other partitions go on.
    #[test]
    fn revoking_a_partition_drops_its_events() {
        let mut schedule = Schedule::new(10, 100);
        schedule.push(event(0, 0, "a"));
        schedule.push(event(1, 0, "b"));
        schedule.push(event(1, 1, "b"));
        assert_eq!(schedule.take_ready(0).len(), 2);
        schedule.revoke(&("events".to_owned(), 1));
        assert_eq!(schedule.len(), 1);
        assert_eq!(schedule.committable(), [(("events".to_owned(), 0), 0)]);
        schedule.finished("a");
        assert!(schedule.is_empty());
        assert!(schedule.take_ready(0).is_empty());
    }

    /// Any mix of arrivals, deliveries and failures: each entity's events finish in arrival
    /// order, one entity never has two requests at once, the requests stay within the bound,
    /// and a partition's committable offset only moves forward and never passes an event
    /// that is not finished.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            Arrive { partition: i32, entity: u8 },
            Send,
            Deliver(usize),
            Fail(usize),
            Tick,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (0..2i32, 0..5u8)
                    .prop_map(|(partition, entity)| Step::Arrive { partition, entity }),
                Just(Step::Send),
                (0..8usize).prop_map(Step::Deliver),
                (0..8usize).prop_map(Step::Fail),
                Just(Step::Tick),
            ]
        }

        proptest! {
            #[test]
            fn order_bounds_and_commits_hold(steps in proptest::collection::vec(step(), 1..200)) {
                let mut schedule: Schedule<()> = Schedule::new(3, 50);
                let mut next_offset = [0i64; 2];
                let mut arrived: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
                let mut finished: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
                let mut in_flight: Vec<Queued<()>> = Vec::new();
                let mut unfinished: BTreeSet<(i32, i64)> = BTreeSet::new();
                let mut committed: HashMap<Partition, i64> = HashMap::new();
                let mut now = 0i64;
                for step in steps {
                    match step {
                        Step::Arrive { partition, entity } if schedule.has_room() => {
                            let offset = next_offset[partition as usize];
                            next_offset[partition as usize] += 1;
                            let entity = format!("e{entity}");
                            arrived.entry(entity.clone()).or_default().push((partition, offset));
                            unfinished.insert((partition, offset));
                            schedule.push(Queued {
                                partition: ("t".to_owned(), partition),
                                offset,
                                entity,
                                item: (),
                            });
                        }
                        Step::Arrive { .. } => {}
                        Step::Send => {
                            let ready = schedule.take_ready(now);
                            for event in &ready {
                                prop_assert!(
                                    in_flight.iter().all(|other| other.entity != event.entity),
                                    "two requests for {}", event.entity
                                );
                            }
                            in_flight.extend(ready);
                            prop_assert!(in_flight.len() <= 3);
                        }
                        Step::Deliver(pick) if !in_flight.is_empty() => {
                            let event = in_flight.remove(pick % in_flight.len());
                            schedule.finished(&event.entity);
                            unfinished.remove(&(event.partition.1, event.offset));
                            finished
                                .entry(event.entity.clone())
                                .or_default()
                                .push((event.partition.1, event.offset));
                        }
                        Step::Fail(pick) if !in_flight.is_empty() => {
                            let event = in_flight.remove(pick % in_flight.len());
                            schedule.retry_at(&event.entity, now + 5);
                        }
                        Step::Deliver(_) | Step::Fail(_) => {}
                        Step::Tick => now += 3,
                    }
                    for (partition, offset) in schedule.committable() {
                        let before = committed.insert(partition.clone(), offset).unwrap_or(0);
                        prop_assert!(offset >= before, "committable went back");
                        prop_assert!(
                            unfinished.iter().all(|(p, o)| *p != partition.1 || *o >= offset),
                            "committable {offset} passes an unfinished event of {partition:?}"
                        );
                    }
                }
                for (entity, done) in &finished {
                    let order = &arrived[entity];
                    prop_assert_eq!(&order[..done.len()], &done[..], "order of {}", entity);
                }
            }
        }
    }
}
