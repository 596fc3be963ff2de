//! The conformance suite against Redis 7 (`OONA_TEST_REDIS_URL`).

mod common;

fn main() -> std::process::ExitCode {
    oona_conformance::run_with_env("OONA_TEST_REDIS_URL", |url| {
        common::RedisFixture::new("redis7", url)
    })
}
