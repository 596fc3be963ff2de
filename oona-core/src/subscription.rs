//! What a consumer asks for: [`Subscription`].

use std::time::Duration;

use crate::envelope::Timestamp;
use crate::topic::{Name, Topic};

/// Where a consumer group starts reading when it is created.
///
/// The start position applies only when the group does not exist yet on the
/// broker; an existing group resumes from what it has settled (like Kafka's
/// `auto.offset.reset`, Redis `XGROUP CREATE ... <id>` and Pulsar's initial
/// position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// Only messages published after the group was created.
    #[default]
    Latest,
    /// All retained history: replay from the oldest retained message.
    Earliest,
    /// Messages published at or after this instant.
    At(Timestamp),
}

/// A subscription: which topic, which consumer group, and the delivery policy
/// of this consumer.
///
/// Consumers with the same `group` compete (each message goes to one of
/// them); different groups each see every message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The topic to read.
    pub topic: Topic,
    /// The consumer group.
    pub group: Name,
    /// This consumer's name within the group (default: unique).
    pub consumer: Name,
    /// Where a new group starts.
    pub start: StartPosition,
    /// Most deliveries handed out and not yet settled, per consumer. The
    /// transport stops reading when this many are in flight (flow control).
    pub prefetch: usize,
    /// How long a delivery may stay unsettled before the broker gives it to
    /// another consumer (or the same one) again.
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered. `1` means no
    /// retry.
    pub max_attempts: u32,
    /// Where dead letters go (default `<topic>.dlq`).
    pub dead_letter: Topic,
    /// Keep per-key order across competing consumers: a message is not
    /// handed out while an earlier message with the same key is unsettled in
    /// the group. Requires [`crate::Capabilities::key_ordered_competing`].
    pub key_ordered: bool,
}

impl Subscription {
    /// Default [`Subscription::prefetch`].
    pub const DEFAULT_PREFETCH: usize = 256;
    /// Default [`Subscription::ack_deadline`].
    pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(30);
    /// Default [`Subscription::max_attempts`].
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

    /// Subscribe `group` to `topic` with the defaults.
    pub fn new(topic: Topic, group: Name) -> Self {
        let dead_letter = topic.dead_letter();
        Subscription {
            topic,
            consumer: Name::unique(group.as_str()),
            group,
            start: StartPosition::default(),
            prefetch: Self::DEFAULT_PREFETCH,
            ack_deadline: Self::DEFAULT_ACK_DEADLINE,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            dead_letter,
            key_ordered: false,
        }
    }

    /// Name this consumer.
    pub fn consumer(mut self, consumer: Name) -> Self {
        self.consumer = consumer;
        self
    }
    /// Set where a new group starts.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
    /// Set the prefetch (at least 1).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Set the ack deadline.
    pub fn ack_deadline(mut self, d: Duration) -> Self {
        self.ack_deadline = d;
        self
    }
    /// Set the attempts before dead-lettering (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Set the dead-letter topic.
    pub fn dead_letter(mut self, topic: Topic) -> Self {
        self.dead_letter = topic;
        self
    }
    /// Ask for per-key order across competing consumers.
    pub fn key_ordered(mut self, yes: bool) -> Self {
        self.key_ordered = yes;
        self
    }
}
