//! The facade's tracing spans: `oona.publish` and `oona.deliver`.
#![cfg(feature = "memory")]

mod common;

use std::sync::{Arc, Mutex};

use common::{bus, sub, topic, wait_stats};
use oona::Incoming;
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Records every span's name and fields.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<(String, String)>>>);

struct Fields(String);
impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", f.name(), v));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        let mut f = Fields(String::new());
        attrs.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_string(), f.0));
    }
}

// current_thread: the runner's tasks run on this thread, under the
// thread-local subscriber set below.
#[tokio::test(flavor = "current_thread")]
async fn publish_and_deliver_are_spanned() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(spans.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = bus().await;
    let t = topic("system.events.epoch");
    let h = bus
        .runner::<u32>(sub(&t, "nissa"))
        .start(|_m: Incoming<u32>| async { Ok(()) })
        .await
        .unwrap();
    let receipt = bus.publish(&t, &7u32).await.unwrap();
    wait_stats(&h, |s| s.acked == 1).await;
    h.shutdown().await.unwrap();

    let spans = spans.0.lock().unwrap().clone();
    let id = receipt.event_id.to_string();
    let find = |name: &str| {
        spans
            .iter()
            .find(|(n, f)| n == name && f.contains(&id))
            .unwrap_or_else(|| panic!("no {name} span with event id {id}: {spans:?}"))
            .1
            .clone()
    };
    let publish = find("oona.publish");
    assert!(publish.contains("topic=system.events.epoch"), "{publish}");
    // The facade's own span (transports may add theirs inside it).
    assert!(
        spans
            .iter()
            .any(|(n, f)| n == "oona.publish" && f.contains(&id) && f.contains("sender=oona-test")),
        "{spans:?}"
    );
    let deliver = find("oona.deliver");
    assert!(deliver.contains("group=nissa"), "{deliver}");
    assert!(deliver.contains("attempt=1"), "{deliver}");
}
