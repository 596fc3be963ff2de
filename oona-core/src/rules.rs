//! The delivery rules. The core owns them; transports call these functions
//! and map the results onto their broker, never re-deciding them.
//!
//! - **Attempts.** A message's first delivery to a group is attempt 1; every
//!   redelivery to that group (after a nack, or after the ack deadline passed
//!   unsettled) adds one.
//! - **Ack** removes the message from the group for good.
//! - **Nack** redelivers after the optional delay, unless this was attempt
//!   `max_attempts`: then it is dead-lettered with reason
//!   `max attempts reached (N of N); last: nacked`.
//! - **Reject** dead-letters at once with the caller's reason.
//! - **Deadline.** A message about to be delivered for attempt
//!   `max_attempts + 1` (its last holder neither acked nor nacked it) is
//!   dead-lettered instead ([`exceeded_attempts`]).
//! - **Poison.** An entry that does not decode as an envelope is
//!   dead-lettered with reason `decode: ...` ([`poison_dead_letter`]); the
//!   consumer goes on.
//! - **Dead letters** are envelopes on the dead-letter topic (default
//!   `<topic>.dlq`): the original `event_id`, sender, timestamp, trace,
//!   key, content type, schema, priority, headers and payload unchanged,
//!   `topic` set to the dead-letter topic, and the `oona-dlq-*` headers of
//!   [`crate::envelope::header`] added. [`DeadLetterInfo::parse`] recovers
//!   the original envelope exactly.

use std::time::Duration;

use bytes::Bytes;

use crate::delivery::{DeliveryInfo, Outcome, Settlement};
use crate::envelope::{header, ContentType, Envelope, EventId, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::{PolicySet, Topic};

/// Decide what an outcome means for a delivery.
pub fn settle(envelope: &Envelope, info: &DeliveryInfo, outcome: Outcome) -> Settlement {
    match outcome {
        Outcome::Ack => Settlement::Ack,
        Outcome::Nack { delay, .. } if info.attempt < info.max_attempts => Settlement::Redeliver {
            delay: delay.unwrap_or(Duration::ZERO),
        },
        Outcome::Nack { reason: why, .. } => {
            let mut reason = format!(
                "max attempts reached ({} of {}); last: nacked",
                info.attempt, info.max_attempts
            );
            if let Some(why) = why {
                reason.push_str(": ");
                reason.push_str(&why);
            }
            Settlement::DeadLetter {
                dead_letter: Box::new(dead_letter(envelope, info, &reason)),
                reason,
            }
        }
        Outcome::Reject { reason } => Settlement::DeadLetter {
            dead_letter: Box::new(dead_letter(envelope, info, &reason)),
            reason,
        },
    }
}

/// A short name of a settlement, for logs and spans.
pub fn settlement_name(s: &Settlement) -> &'static str {
    match s {
        Settlement::Ack => "ack",
        Settlement::Redeliver { .. } => "redeliver",
        Settlement::DeadLetter { .. } => "dead_letter",
    }
}

/// If a message is about to be delivered for an attempt past `max_attempts`
/// (its holders let the ack deadline pass), the dead letter to publish
/// instead, with its reason.
pub fn exceeded_attempts(envelope: &Envelope, info: &DeliveryInfo) -> Option<(Envelope, String)> {
    if info.attempt <= info.max_attempts {
        return None;
    }
    let reason = format!(
        "max attempts reached ({} of {}); last: ack deadline expired unsettled",
        info.attempt - 1,
        info.max_attempts
    );
    Some((dead_letter(envelope, info, &reason), reason))
}

/// Build the dead letter of `envelope`.
pub fn dead_letter(envelope: &Envelope, info: &DeliveryInfo, reason: &str) -> Envelope {
    let mut dl = envelope.clone();
    dl.topic = info.dead_letter.clone();
    let h = &mut dl.headers;
    h.insert(header::DLQ_REASON.into(), reason.to_string());
    h.insert(
        header::DLQ_ORIGINAL_TOPIC.into(),
        envelope.topic.to_string(),
    );
    h.insert(header::DLQ_GROUP.into(), info.group.to_string());
    h.insert(
        header::DLQ_ATTEMPTS.into(),
        info.attempt.min(info.max_attempts).to_string(),
    );
    h.insert(header::DLQ_AT.into(), Timestamp::now().to_rfc3339());
    if let Some(pos) = &info.position {
        h.insert(header::DLQ_ORIGINAL_POSITION.into(), pos.clone());
    }
    dl
}

/// Build the dead letter of a raw entry that is not an envelope. `raw` is
/// the entry as the transport found it (for Redis, its fields as a JSON
/// object), `content_type` says how to read it, and `error` is the decode
/// error.
pub fn poison_dead_letter(
    read_from: &Topic,
    raw: Bytes,
    content_type: ContentType,
    error: &Error,
    info: &DeliveryInfo,
) -> (Envelope, String) {
    let reason = format!("decode: {error}");
    let original = Envelope::builder(read_from.clone(), raw)
        .event_id(EventId::new())
        .sender_id("oona")
        .content_type(content_type)
        .build();
    (dead_letter(&original, info, &reason), reason)
}

/// What a dead letter says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterInfo {
    /// Why it was dead-lettered.
    pub reason: String,
    /// The group that gave up on it.
    pub group: String,
    /// Attempts made.
    pub attempts: u32,
    /// When.
    pub at: Option<Timestamp>,
    /// The broker position of the original, when known.
    pub original_position: Option<String>,
    /// The original envelope, exactly as published.
    pub original: Envelope,
}

impl DeadLetterInfo {
    /// Read a dead letter; `None` if `env` is not one.
    pub fn parse(env: &Envelope) -> Option<DeadLetterInfo> {
        let reason = env.header(header::DLQ_REASON)?.to_string();
        let original_topic = Topic::new(env.header(header::DLQ_ORIGINAL_TOPIC)?).ok()?;
        let mut original = env.clone();
        original.topic = original_topic;
        let mut take = |k: &str| original.headers.remove(k);
        take(header::DLQ_REASON);
        take(header::DLQ_ORIGINAL_TOPIC);
        let group = take(header::DLQ_GROUP).unwrap_or_default();
        let attempts = take(header::DLQ_ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let at = take(header::DLQ_AT).and_then(|t| Timestamp::parse_rfc3339(&t).ok());
        let original_position = take(header::DLQ_ORIGINAL_POSITION);
        Some(DeadLetterInfo {
            reason,
            group,
            attempts,
            at,
            original_position,
            original,
        })
    }
}

/// Checks every transport makes before any I/O of a publish: the payload
/// limit of the topic's policy and of the transport.
pub fn check_publish(
    envelope: &Envelope,
    policies: &PolicySet,
    transport_max: usize,
) -> Result<()> {
    policies
        .for_topic(&envelope.topic)
        .check_payload(&envelope.topic, envelope.payload.len())?;
    if envelope.payload.len() > transport_max {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "payload of {} bytes for topic {} exceeds the transport's limit of {transport_max} bytes",
                envelope.payload.len(),
                envelope.topic
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Name;
    use crate::{Retention, Subscription, TopicPolicy};

    fn info(attempt: u32, max: u32) -> (Envelope, DeliveryInfo) {
        let t = Topic::new("control.kasmina.commands").unwrap();
        let sub = Subscription::new(t.clone(), Name::new("kasmina").unwrap()).max_attempts(max);
        let env = Envelope::builder(t, "{}")
            .sender_id("tamiyo")
            .header("a", "b")
            .build();
        (env, DeliveryInfo::new(&sub, attempt, Some("1-0".into())))
    }

    #[test]
    fn nack_redelivers_until_the_last_attempt() {
        let (e, i) = info(1, 3);
        assert_eq!(
            settle(
                &e,
                &i,
                Outcome::Nack {
                    delay: None,
                    reason: None
                }
            ),
            Settlement::Redeliver {
                delay: Duration::ZERO
            }
        );
        let d = Duration::from_millis(250);
        assert_eq!(
            settle(
                &e,
                &i,
                Outcome::Nack {
                    delay: Some(d),
                    reason: None
                }
            ),
            Settlement::Redeliver { delay: d }
        );
        let (e, i) = info(3, 3);
        match settle(
            &e,
            &i,
            Outcome::Nack {
                delay: None,
                reason: None,
            },
        ) {
            Settlement::DeadLetter {
                dead_letter,
                reason,
            } => {
                assert_eq!(reason, "max attempts reached (3 of 3); last: nacked");
                assert_eq!(dead_letter.topic.as_str(), "control.kasmina.commands.dlq");
                let dli = DeadLetterInfo::parse(&dead_letter).unwrap();
                assert_eq!(dli.original, e);
                assert_eq!(dli.attempts, 3);
                assert_eq!(dli.group, "kasmina");
                assert_eq!(dli.original_position.as_deref(), Some("1-0"));
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
        let why = Outcome::Nack {
            delay: None,
            reason: Some("db timeout".into()),
        };
        match settle(&e, &i, why) {
            Settlement::DeadLetter { reason, .. } => {
                assert_eq!(
                    reason,
                    "max attempts reached (3 of 3); last: nacked: db timeout"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reject_dead_letters_at_once_and_ack_acks() {
        let (e, i) = info(1, 5);
        assert_eq!(settle(&e, &i, Outcome::Ack), Settlement::Ack);
        match settle(
            &e,
            &i,
            Outcome::Reject {
                reason: "bad command".into(),
            },
        ) {
            Settlement::DeadLetter {
                dead_letter,
                reason,
            } => {
                assert_eq!(reason, "bad command");
                assert_eq!(dead_letter.header(header::DLQ_REASON), Some("bad command"));
                assert_eq!(dead_letter.event_id, e.event_id);
                assert_eq!(dead_letter.payload, e.payload);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deadline_expiry_counts_as_an_attempt() {
        let (e, i) = info(3, 3);
        assert!(exceeded_attempts(&e, &i).is_none());
        let (e, i) = info(4, 3);
        let (dl, reason) = exceeded_attempts(&e, &i).unwrap();
        assert!(reason.contains("3 of 3"), "{reason}");
        assert_eq!(DeadLetterInfo::parse(&dl).unwrap().attempts, 3);
    }

    #[test]
    fn poison_keeps_the_raw_bytes() {
        let (_, i) = info(1, 3);
        let t = Topic::new("control.kasmina.commands").unwrap();
        let err = Error::new(ErrorKind::Decode, "entry has no \"event_id\" field");
        let (dl, reason) = poison_dead_letter(
            &t,
            Bytes::from_static(b"{\"foo\":\"bar\"}"),
            ContentType::json(),
            &err,
            &i,
        );
        assert!(reason.starts_with("decode: "));
        assert_eq!(&dl.payload[..], b"{\"foo\":\"bar\"}");
        assert_eq!(DeadLetterInfo::parse(&dl).unwrap().original.topic, t);
    }

    #[test]
    fn publish_checks() {
        let t = Topic::new("telemetry.seed.health").unwrap();
        let env = Envelope::builder(t, vec![0u8; 100]).build();
        let p = PolicySet::default().with_plane(
            "telemetry",
            TopicPolicy::new(Retention::Indefinite).with_max_payload_bytes(99),
        );
        assert_eq!(
            check_publish(&env, &p, 1000).unwrap_err().kind(),
            ErrorKind::PayloadTooLarge
        );
        assert!(check_publish(&env, &PolicySet::default(), 1000).is_ok());
        assert!(check_publish(&env, &PolicySet::default(), 99).is_err());
    }
}
