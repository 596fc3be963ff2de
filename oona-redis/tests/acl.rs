//! Redis ACL users on the genuine server (`OONA_TEST_REDIS_URL`, with
//! `OONA_TEST_REQUIRE=1` a missing one fails): wrong credentials are a
//! permanent `Unauthenticated` error at once, and a user limited to the
//! telemetry plane gets `Unauthorized`, naming the topic, on the others.
//! The users are made with `ACL SETUSER` for the test and deleted after.

use std::time::Duration;

use oona_core::{ErrorKind, Transport};
use oona_redis::RedisTransport;

fn url() -> Option<String> {
    oona_conformance::url_of("OONA_TEST_REDIS_URL")
}

/// An ACL user for one test, deleted when dropped... by `drop_user`.
struct User {
    admin: redis::aio::MultiplexedConnection,
    name: String,
}

impl User {
    async fn create(url: &str, rules: &[&str]) -> User {
        let client = redis::Client::open(url).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let name = format!("oona-acl-{}", uuid::Uuid::new_v4().simple());
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&name).arg("reset").arg("on");
        for r in rules {
            cmd.arg(*r);
        }
        cmd.query_async::<()>(&mut admin).await.unwrap();
        User { admin, name }
    }

    /// `url` with this user and `password` in it.
    fn url(&self, url: &str, password: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_username(&self.name).unwrap();
        u.set_password(Some(password)).unwrap();
        u.to_string()
    }

    async fn drop_user(mut self) {
        redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query_async::<()>(&mut self.admin)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_at_once() {
    let Some(url) = url() else { return };
    let user = User::create(&url, &[">right-password-1", "~*", "&*", "+@all"]).await;
    let wrong = user.url(&url, "not-the-password-7");
    let r = tokio::time::timeout(Duration::from_secs(20), RedisTransport::connect_url(&wrong))
        .await
        .expect("a refused password is an error, not a retry loop");
    let e = r.expect_err("a wrong password connects");
    println!("wrong password: {e}");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(
        !format!("{e} {e:?}").contains("not-the-password-7"),
        "{e:?}"
    );
    // The right one works.
    let t = RedisTransport::connect_url(&user.url(&url, "right-password-1"))
        .await
        .unwrap();
    t.close().await.unwrap();
    user.drop_user().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_user_is_refused_the_other_planes_by_topic() {
    let Some(url) = url() else { return };
    // The recipe of the README: the plane's keys and the topic registry.
    let user = User::create(
        &url,
        &[
            ">tel-pw-3",
            "~oona:telemetry.*",
            "~oona:_topics",
            "&*",
            "+@all",
        ],
    )
    .await;
    let t = RedisTransport::connect_url(&user.url(&url, "tel-pw-3"))
        .await
        .unwrap();
    oona_conformance::access::telemetry_user_refused_other_planes(&t).await;
    t.close().await.unwrap();
    user.drop_user().await;
}
