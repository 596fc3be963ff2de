//! A group's depth where Redis keeps no lag for it (a group created at an
//! id in the middle of the stream, as `StartPosition::At` does): the
//! entries after its last delivered id are counted. On the genuine Redis
//! of `OONA_TEST_REDIS_URL` (with `OONA_TEST_REQUIRE=1` a missing one
//! fails).

use oona_core::{Envelope, Name, Topic, Transport};
use oona_redis::RedisTransport;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_is_counted_where_redis_has_no_lag() {
    let Some(url) = oona_conformance::url_of("OONA_TEST_REDIS_URL") else {
        return;
    };
    let t = RedisTransport::connect_url(&url).await.unwrap();
    let topic = Topic::new(format!(
        "telemetry.depth{}.lagless",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    let batch: Vec<Envelope> = (0..5)
        .map(|i| Envelope::builder(topic.clone(), format!("{i}")).build())
        .collect();
    let receipts = t.publish_batch(batch).await.unwrap();
    let second = receipts[1].position.clone().unwrap();
    let group = Name::new("lagless").unwrap();
    let raw = redis::Client::open(url.as_str()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let key = t.stream_key(&topic);
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(group.as_str())
        .arg(&second)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let info: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(groups) = &info else {
        panic!("XINFO GROUPS: {info:?}")
    };
    let redis::Value::Array(fields) = &groups[0] else {
        panic!("XINFO GROUPS: {info:?}")
    };
    let lag = fields
        .chunks(2)
        .find(|kv| kv[0] == redis::Value::BulkString(b"lag".to_vec()))
        .map(|kv| kv[1].clone());
    assert_eq!(lag, Some(redis::Value::Nil), "Redis keeps no lag: {info:?}");
    let d = t.depth(&topic, &group).await.unwrap();
    assert_eq!(
        (d.backlog, d.pending),
        (3, 0),
        "three entries follow the second"
    );
    t.delete_topic(&topic).await.unwrap();
    t.close().await.unwrap();
}
