//! Publishing and consuming the platform's typed contracts
//! ([`oona_contracts`], feature `contracts`, on by default).
//!
//! A contract type knows its topic and schema ([`Message`]), so none of
//! these calls takes a topic string:
//!
//! | call | topic | codec | schema id |
//! |---|---|---|---|
//! | [`Bus::publish_contract`] / [`Bus::message_contract`] | `T::topic()` | JSON | `T::schema_id()` |
//! | [`Bus::message_contract`]`(..).codec(..)` | `T::topic()` | yours ([`AnyCodec::protobuf`], [`AnyCodec::avro`], ...) | the codec's, else `T::schema_id()` |
//! | [`Bus::subscribe_contract`] / [`Bus::runner_contract`] | `T::topic()` | [`AnyCodec`]: decodes JSON, protobuf or Avro by content type | checked against `T` |
//!
//! A payload that does not decode as `T` (wrong field type, another schema,
//! an unknown content type) is dead-lettered with a `decode: ...` reason.

use oona_contracts::{AnyCodec, Message};
use oona_core::{Error, ErrorKind, Json, Name, Receipt, Result, Subscription, Topic};

use crate::bus::{Bus, MessageBuilder, TypedSubscription};
use crate::runner::Runner;

/// What [`Bus::subscribe_contract`] and [`Bus::runner_contract`] take: a
/// consumer group name (`&str`, `String`, [`Name`]), which subscribes to
/// the contract's topic with the default options, or a full
/// [`Subscription`] (from [`contract_subscription`]) for other options. A
/// `Subscription` on another topic is an [`ErrorKind::ConfigInvalid`]
/// error.
pub trait IntoContractSubscription {
    /// The subscription to `topic`, the contract's topic.
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription>;
}

impl IntoContractSubscription for &str {
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription> {
        Ok(Subscription::new(topic, Name::new(self)?))
    }
}

impl IntoContractSubscription for String {
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription> {
        Ok(Subscription::new(topic, Name::new(self)?))
    }
}

impl IntoContractSubscription for &String {
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription> {
        self.as_str().into_contract_subscription(topic)
    }
}

impl IntoContractSubscription for Name {
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription> {
        Ok(Subscription::new(topic, self))
    }
}

impl IntoContractSubscription for Subscription {
    fn into_contract_subscription(self, topic: Topic) -> Result<Subscription> {
        // A subscription built for another topic would decode every
        // message as the wrong type and dead-letter it: refuse it up front.
        if self.topic != topic {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "subscription is on topic {}, but the contract is published on {topic}",
                    self.topic
                ),
            ));
        }
        Ok(self)
    }
}

/// A subscription of `group` to `T`'s topic, to adjust (`.max_attempts(3)`,
/// `.consumer(..)`) before passing it to [`Bus::runner_contract`] or
/// [`Bus::subscribe_contract`].
pub fn contract_subscription<T: Message>(
    group: impl IntoContractSubscription,
) -> Result<Subscription> {
    group.into_contract_subscription(T::topic())
}

impl Bus {
    /// Publish a contract value to its topic (`T::topic()`) as JSON, with
    /// its schema id (`esper.v1.FieldReport/1`). The bytes and content type
    /// are those [`AnyCodec::json`] writes.
    pub async fn publish_contract<T: Message>(&self, value: &T) -> Result<Receipt> {
        self.message_contract(value).send().await
    }

    /// Start a message of a contract value to its topic, with options; JSON
    /// unless [`MessageBuilder::codec`] says otherwise
    /// (`.codec(&AnyCodec::protobuf())`). The schema id is the codec's, or
    /// `T::schema_id()` when the codec names none (plain [`Json`]).
    pub fn message_contract<'a, T: Message>(&'a self, value: &'a T) -> MessageBuilder<'a, T, Json> {
        let mut builder = MessageBuilder::new(self, &Json, Ok(T::topic()), value);
        builder.contract_schema = Some(T::schema_id());
        builder.contract_avro = Some(T::AVRO_SCHEMA);
        builder
    }

    /// Deliveries of `T`'s topic, decoded by content type (JSON, protobuf
    /// or Avro) with [`AnyCodec`]. A payload that does not decode as `T` is
    /// dead-lettered with a `decode: ...` reason and skipped.
    pub async fn subscribe_contract<T: Message>(
        &self,
        group: impl IntoContractSubscription,
    ) -> Result<TypedSubscription<T, AnyCodec>> {
        let subscription = contract_subscription::<T>(group)?;
        Ok(self
            .subscribe::<T>(subscription)
            .await?
            .codec(AnyCodec::default()))
    }

    /// A handler runner on `T`'s topic, decoding by content type with
    /// [`AnyCodec`]. A payload that does not decode as `T` is dead-lettered
    /// with a `decode: ...` reason without calling the handler. A group
    /// name that does not validate fails at [`Runner::start`] or
    /// [`Runner::run`].
    pub fn runner_contract<T: Message>(
        &self,
        group: impl IntoContractSubscription,
    ) -> Runner<T, AnyCodec> {
        Runner::new(
            self.clone(),
            contract_subscription::<T>(group),
            AnyCodec::default(),
        )
    }
}
