//! The conformance suite against Redis 8 (`OONA_TEST_REDIS8_URL`).

mod common;

fn main() -> std::process::ExitCode {
    oona_conformance::run_with_env("OONA_TEST_REDIS8_URL", |url| {
        common::RedisFixture::new("redis8", url)
    })
}
