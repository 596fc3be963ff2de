//! The outage check of the degradation path
//! (`oona_conformance::outage`) on the genuine broker: publishers reach
//! it through the broker's `cut` listener (`OONA_TEST_PULSAR_CUT_LISTEN`,
//! advertised there, forwarded to `OONA_TEST_PULSAR_CUT_UPSTREAM` by a
//! proxy this test owns), cut for 60 s; the reader uses
//! `OONA_TEST_PULSAR_URL`. With `OONA_TEST_REQUIRE=1` a missing one fails.

use std::sync::Arc;

use oona_core::Transport;

use oona_conformance::outage::{
    by_driver, cut_listener, publisher_child, publishers_lose_nothing, Child,
};

/// The publisher child of the outage test (does nothing unless run by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_publisher_child() {
    publisher_child(by_driver(oona_pulsar::DRIVER)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_and_a_killed_publisher_lose_nothing() {
    let Some(url) = oona_conformance::url_of("OONA_TEST_PULSAR_URL") else {
        return;
    };
    let (mut proxy, listen) = cut_listener("OONA_TEST_PULSAR");
    // The test URL's tenant, namespace and admin URL, through the cut.
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let child_url = format!("pulsar://{listen}?{query}");
    let reader = Arc::new(
        oona_pulsar::PulsarTransport::connect_url(&url)
            .await
            .unwrap(),
    );
    let child = Child {
        test: "outage_publisher_child",
        url: &child_url,
    };
    let report = publishers_lose_nothing("pulsar", child, &mut proxy, reader.clone()).await;
    println!("outage [pulsar, connections cut]: {report}");
    reader.close().await.unwrap();
}
