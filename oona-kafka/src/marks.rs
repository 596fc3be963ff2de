//! Attempt counts that survive a crash of a group member. Kafka counts no
//! deliveries, so each partition's committed offset carries them in its
//! commit metadata (a string Kafka stores beside the offset):
//!
//! `oona1;below=<offset>;charged=<offset>:<attempt>,...`
//!
//! - `below`: every record of the partition before this offset may have
//!   been handed out by the member that committed it. A member gives its
//!   consumer only records before the `below` it has on the broker; its
//!   commit thread raises the mark two prefetches ahead when consumption
//!   comes within a prefetch of it. It lowers the mark again when it
//!   leaves in order (what it read ahead was never handed out). A new owner that finds
//!   uncommitted records below it knows their holder vanished: it hands
//!   them out as recovered, one at a time, each at one attempt more.
//! - `charged`: the attempt at which a recovered record was handed out
//!   (written before it is), so a record that kills one member after
//!   another counts every crash and reaches the dead-letter topic after
//!   `max_attempts`, alone.
//!
//! Metadata that is not Oona's (another client of the group) reads as no
//! marks.

use std::collections::BTreeMap;

const VERSION: &str = "oona1";
/// Kafka's `offset.metadata.max.bytes` is 4,096 by default.
const MAX_LEN: usize = 4000;

/// The marks of one partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Marks {
    /// Records before this offset may have been handed out.
    pub below: i64,
    /// Attempt of each recovered record at its hand-out, by offset.
    pub charged: BTreeMap<i64, u32>,
}

impl Marks {
    /// Read commit metadata; anything else reads as no marks.
    pub(crate) fn parse(s: &str) -> Marks {
        let mut parts = s.split(';');
        if parts.next() != Some(VERSION) {
            return Marks::default();
        }
        let mut m = Marks::default();
        for p in parts {
            match p.split_once('=') {
                Some(("below", v)) => m.below = v.parse().unwrap_or(0),
                Some(("charged", v)) => {
                    m.charged = v
                        .split(',')
                        .filter_map(|c| {
                            let (o, a) = c.split_once(':')?;
                            Some((o.parse().ok()?, a.parse().ok()?))
                        })
                        .collect();
                }
                _ => {} // a later version's field
            }
        }
        m
    }

    /// The metadata to commit with offset `from` (charges of records
    /// already committed are left out; the oldest go first if the string
    /// would outgrow Kafka's limit).
    pub(crate) fn encode(&self, from: i64) -> String {
        let mut out = format!("{VERSION};below={}", self.below.max(from));
        let charged: Vec<String> = self
            .charged
            .range(from..self.below.max(from))
            .map(|(o, a)| format!("{o}:{a}"))
            .collect();
        let budget = MAX_LEN.saturating_sub(out.len() + ";charged=".len());
        let mut len: usize = charged.iter().map(|c| c.len() + 1).sum();
        let mut skip = 0;
        while len > budget && skip < charged.len() {
            len -= charged[skip].len() + 1;
            skip += 1;
        }
        if skip < charged.len() {
            out.push_str(";charged=");
            out.push_str(&charged[skip..].join(","));
        }
        out
    }

    /// The attempt of a recovered record read with `attempt` in its
    /// headers: one more than its last hand-out.
    pub(crate) fn after_crash(&self, offset: i64, attempt: u32) -> u32 {
        self.charged
            .get(&offset)
            .copied()
            .unwrap_or(attempt)
            .max(attempt)
            .saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_leaves_out_committed_charges() {
        let mut m = Marks {
            below: 120,
            ..Marks::default()
        };
        m.charged.insert(90, 3);
        m.charged.insert(101, 2);
        let s = m.encode(100);
        assert_eq!(s, "oona1;below=120;charged=101:2");
        let back = Marks::parse(&s);
        assert_eq!(back.below, 120);
        assert_eq!(back.charged.get(&101), Some(&2));
        assert_eq!(back.charged.get(&90), None);
    }

    #[test]
    fn foreign_or_broken_metadata_is_no_marks() {
        assert_eq!(Marks::parse(""), Marks::default());
        assert_eq!(Marks::parse("checkpoint-7"), Marks::default());
        let m = Marks::parse("oona1;below=x;charged=5:y,6:2;later=1");
        assert_eq!(m.below, 0);
        assert_eq!(m.charged.into_iter().collect::<Vec<_>>(), vec![(6, 2)]);
    }

    #[test]
    fn crash_counts_from_the_last_hand_out() {
        let mut m = Marks::default();
        assert_eq!(m.after_crash(7, 1), 2, "read ahead, never charged");
        assert_eq!(m.after_crash(7, 3), 4, "a retry record's header counts");
        m.charged.insert(7, 4);
        assert_eq!(m.after_crash(7, 1), 5);
    }

    #[test]
    fn stays_inside_kafkas_metadata_limit() {
        let mut m = Marks {
            below: 1_000_000_000,
            ..Marks::default()
        };
        for o in 0..2000 {
            m.charged.insert(999_000_000 + o, 2);
        }
        let s = m.encode(0);
        assert!(s.len() <= MAX_LEN, "{} bytes", s.len());
        let back = Marks::parse(&s);
        assert!(
            back.charged.contains_key(&(999_000_000 + 1999)),
            "newest kept"
        );
        assert!(!back.charged.contains_key(&999_000_000), "oldest dropped");
    }
}
