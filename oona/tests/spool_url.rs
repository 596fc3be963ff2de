//! Spooling turned on by the URL (`spool_dir=...`), as `OONA_URL` would.

use std::time::Duration;

use oona::{ErrorKind, Topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_dir_in_the_url_publishes_through_a_spool() {
    let dir =
        std::env::temp_dir().join(format!("oona-spool-url-{}", uuid::Uuid::new_v4().simple()));
    let url = format!(
        "memory://m{}?spool_dir={}&spool_sync=never&breaker_call_timeout=2s",
        uuid::Uuid::new_v4().simple(),
        dir.display()
    );
    let t = oona::connect(&url).await.unwrap();
    assert_eq!(t.name(), "memory", "the transport behind the spool");
    assert!(
        dir.join("seg-00000000000000000000.log").exists(),
        "the spool is open"
    );
    let topic = Topic::new("telemetry.spoolurl.t").unwrap();
    oona_conformance::one_round_trip(t.as_ref(), &topic, Duration::from_secs(10)).await;
    t.close().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);

    let e = oona::connect("memory://?breaker_failures=2")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("`spool_dir`"), "{e}");
}
