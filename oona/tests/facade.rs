//! connect(), from_env() and the URL errors (no transport needed).

use oona::ErrorKind;

#[tokio::test]
async fn unknown_scheme_lists_the_known_schemes() {
    let e = oona::connect("nats://127.0.0.1:4222").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownScheme);
    let msg = e.to_string();
    for s in [
        "\"nats\"",
        "memory://",
        "redis://",
        "rediss://",
        "kafka://",
        "pulsar://",
        "pulsar+ssl://",
    ] {
        assert!(msg.contains(s), "{s} missing from: {msg}");
    }
}

#[test]
fn env_url_defaults_to_memory() {
    if std::env::var_os(oona::ENV_URL).is_none() {
        assert_eq!(oona::env_url(), "memory://");
    } else {
        assert_ne!(oona::env_url(), "");
    }
}

#[tokio::test]
async fn unparsable_url_is_a_config_error() {
    let e = oona::connect("not a url").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn disabled_redis_feature_is_named() {
    for url in ["redis://127.0.0.1:6379/0", "rediss://h:6380"] {
        let e = oona::connect(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FeatureDisabled, "{e}");
        assert!(
            e.to_string()
                .contains("enable the \"redis\" feature of oona"),
            "{e}"
        );
    }
}

#[cfg(not(feature = "kafka"))]
#[tokio::test]
async fn disabled_kafka_feature_is_named() {
    let e = oona::connect("kafka://127.0.0.1:9092").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FeatureDisabled, "{e}");
    assert!(
        e.to_string()
            .contains("enable the \"kafka\" feature of oona"),
        "{e}"
    );
}

#[cfg(not(feature = "pulsar"))]
#[tokio::test]
async fn disabled_pulsar_feature_is_named() {
    for url in ["pulsar://127.0.0.1:6650", "pulsar+ssl://h:6651"] {
        let e = oona::connect(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FeatureDisabled, "{e}");
        assert!(
            e.to_string()
                .contains("enable the \"pulsar\" feature of oona"),
            "{e}"
        );
    }
}

#[cfg(feature = "memory")]
#[tokio::test]
async fn bad_query_parameter_names_the_key() {
    let e = oona::connect("memory://?capcity=1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("`capcity`"), "{e}");
    let e = oona::connect("memory://?capacity=lots").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("`capacity`"), "{e}");
}

#[test]
fn known_schemes_have_their_features() {
    let f = |s: &str| {
        oona::KNOWN_SCHEMES
            .iter()
            .find(|k| k.scheme == s)
            .map(|k| k.feature)
    };
    assert_eq!(f("memory"), Some("memory"));
    assert_eq!(f("rediss"), Some("redis"));
    assert_eq!(f("pulsar+ssl"), Some("pulsar"));
    assert_eq!(f("kafka"), Some("kafka"));
    // Every compiled-in driver is in the static list.
    for d in oona::drivers() {
        for s in d.schemes {
            assert!(
                f(s).is_some(),
                "driver scheme {s} missing from KNOWN_SCHEMES"
            );
        }
    }
}

#[cfg(not(feature = "memory"))]
#[tokio::test]
async fn disabled_memory_feature_is_named() {
    let e = oona::connect("memory://").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FeatureDisabled, "{e}");
    assert!(
        e.to_string()
            .contains("enable the \"memory\" feature of oona"),
        "{e}"
    );
}

#[cfg(feature = "memory")]
#[tokio::test]
async fn memory_scheme_connects() {
    let t = oona::connect("memory://facade-connect?capacity=10")
        .await
        .unwrap();
    assert_eq!(t.name(), "memory");
    assert!(t.health().await.is_up());
}

/// Independent of this build's features: with no drivers, every known
/// scheme names its feature.
#[tokio::test]
async fn every_known_scheme_without_its_driver_names_its_feature() {
    for k in oona::KNOWN_SCHEMES {
        let url = format!("{}://127.0.0.1:1", k.scheme);
        let e = oona::connect_with(&[], &url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FeatureDisabled, "{e}");
        let want = format!("enable the \"{}\" feature of oona", k.feature);
        assert!(e.to_string().contains(&want), "{e}");
    }
    // Scheme matching ignores case, as URLs do.
    let e = oona::find_driver(&[], "REDIS").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FeatureDisabled);
}
