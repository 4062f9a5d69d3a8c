//! Routing through the real `App`: keys and their limits, breakers, strategies, rules, the
//! capability filter and metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Mesh, attempts, chat, reason};
use switchboard_proto::{
    chat::v1::{SamplingParams, Tool},
    router::v1::Caller,
};
use switchboard_router::{
    KeyConfig, ProviderConfig, ProviderKind, RouteConfig, RuleConfig, Strategy, TargetConfig,
};
use switchboard_status::status_metadata;
use tonic::Code;

fn keyed(alias: &str, rpm: u32) -> KeyConfig {
    KeyConfig {
        rpm,
        ..KeyConfig::new(alias, &format!("sk-{alias}"))
    }
}

fn strings(list: &[(&str, &str, u32)]) -> Vec<(String, String, u32)> {
    list.iter()
        .map(|(t, c, s)| ((*t).to_owned(), (*c).to_owned(), *s))
        .collect()
}

#[tokio::test]
async fn keys_share_the_load_within_their_rpm_and_name_their_alias() {
    let mesh = Mesh::start(&["fake"], |config| {
        let mut target = TargetConfig::new("fake", "m");
        target.keys = vec![keyed("k1", 2), keyed("k2", 3)];
        config.routes = vec![RouteConfig::new("chat", vec![target])];
    })
    .await;
    let mut served = Vec::new();
    for _ in 0..5 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        assert_eq!((info.provider.as_str(), info.model.as_str()), ("fake", "m"));
        // The target stays `provider/model`; the key is named by its alias, never the key.
        assert_eq!(info.target, "fake/m");
        assert_eq!(info.attempts[0].key_alias, info.key_alias);
        served.push(info.key_alias);
    }
    let count = |alias: &str| served.iter().filter(|a| **a == alias).count();
    assert_eq!((count("k1"), count("k2")), (2, 3), "{served:?}");
    let auth = |key: &str| {
        mesh.fake("fake")
            .requests()
            .iter()
            .filter(|r| r.authorization.as_deref() == Some(key))
            .count()
    };
    assert_eq!((auth("Bearer sk-k1"), auth("Bearer sk-k2")), (2, 3));
    // Both keys are at their RPM: the request is not sent at all.
    let status = mesh.route(chat("chat", "hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    assert!(
        status.message().contains("RATE_BUDGET_EXHAUSTED"),
        "{}",
        status.message()
    );
    assert_eq!(mesh.fake("fake").request_count("m"), 5);
    mesh.shutdown().await;
}

#[tokio::test]
async fn an_authentication_error_moves_to_another_key_and_cools_the_bad_one_down() {
    let mesh = Mesh::start(&["fake"], |config| {
        let mut target = TargetConfig::new("fake", "m");
        target.keys = vec![keyed("k1", 0), keyed("k2", 0)];
        config.routes = vec![RouteConfig::new("chat", vec![target])];
    })
    .await;
    mesh.fake("fake").fail_next("m", 401, 1);
    let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
    let list = attempts(&info);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(
        (list[0].1.as_str(), list[0].2),
        ("AUTHENTICATION_ERROR", 401)
    );
    assert_eq!(list[1].1, "");
    assert_ne!(
        info.attempts[0].key_alias, info.attempts[1].key_alias,
        "never the same key again"
    );
    let good = info.key_alias.clone();
    assert_eq!(good, info.attempts[1].key_alias);
    // The bad key cools down: later requests all go to the good one.
    for _ in 0..4 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        assert_eq!(info.key_alias, good);
        assert_eq!(info.attempt_count, 1);
    }
    mesh.shutdown().await;
}

#[tokio::test]
async fn an_open_breaker_skips_the_target_with_a_reason() {
    let mesh = Mesh::start(&["fake", "backup"], |config| {
        config.max_retries = 0;
        config.breaker.failure_threshold = 2;
        config.routes = vec![RouteConfig::new(
            "chat",
            vec![
                TargetConfig::new("fake", "m"),
                TargetConfig::new("backup", "m"),
            ],
        )];
    })
    .await;
    mesh.fake("fake").fail_next("m", 500, 10);
    for _ in 0..2 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        assert_eq!(
            attempts(&info),
            strings(&[("fake/m", "UPSTREAM_ERROR", 500), ("backup/m", "", 200)])
        );
    }
    let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
    assert_eq!(
        attempts(&info),
        strings(&[("fake/m", "CIRCUIT_OPEN", 0), ("backup/m", "", 200)])
    );
    assert_eq!(mesh.fake("fake").request_count("m"), 2);
    mesh.shutdown().await;
}

#[tokio::test]
async fn least_latency_moves_traffic_away_from_a_slow_target() {
    let mesh = Mesh::start(&["a", "b"], |config| {
        config.routes = vec![RouteConfig {
            strategy: Strategy::Latency,
            ..RouteConfig::new(
                "chat",
                vec![TargetConfig::new("a", "m"), TargetConfig::new("b", "m")],
            )
        }];
    })
    .await;
    mesh.fake("a").set_latency("m", 200);
    let mut served = Vec::new();
    for _ in 0..8 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        served.push(info.provider);
    }
    // Each is measured once, then the fast one takes the traffic.
    assert_eq!(served.iter().filter(|p| *p == "a").count(), 1, "{served:?}");
    assert!(served[2..].iter().all(|p| p == "b"), "{served:?}");
    // b slows down, a recovers: traffic moves back within a few requests.
    mesh.fake("a").set_latency("m", 0);
    mesh.fake("b").set_latency("m", 400);
    let mut served = Vec::new();
    for _ in 0..6 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        served.push(info.provider);
    }
    assert_eq!(served[served.len() - 2..], ["a", "a"], "{served:?}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn conditional_rules_pick_the_stated_target() {
    let mesh = Mesh::start(&["fake"], |config| {
        config.routes = vec![RouteConfig {
            rules: vec![
                RuleConfig {
                    task: Some("classification".into()),
                    targets: vec!["fake/small".into()],
                    ..RuleConfig::default()
                },
                RuleConfig {
                    team: Some("eng".into()),
                    task: Some("code".into()),
                    targets: vec!["fake/big".into()],
                    ..RuleConfig::default()
                },
            ],
            ..RouteConfig::new(
                "auto",
                vec![
                    TargetConfig::new("fake", "medium"),
                    TargetConfig::new("fake", "small"),
                    TargetConfig::new("fake", "big"),
                ],
            )
        }];
    })
    .await;
    let tagged = |task: &str| {
        let mut request = chat("auto", "hi");
        request.tags.insert("task".into(), task.into());
        request
    };
    let eng = Caller {
        team: "eng".into(),
        ..Caller::default()
    };
    let served =
        |response: switchboard_proto::router::v1::RouteResponse| response.route.unwrap().target;
    assert_eq!(
        served(mesh.route(tagged("classification")).await.unwrap()),
        "fake/small"
    );
    assert_eq!(
        served(mesh.route_as(tagged("code"), eng.clone()).await.unwrap()),
        "fake/big"
    );
    // The code rule needs the team too; no rule: the route's own order.
    assert_eq!(
        served(mesh.route(tagged("code")).await.unwrap()),
        "fake/medium"
    );
    assert_eq!(
        served(mesh.route_as(chat("auto", "hi"), eng).await.unwrap()),
        "fake/medium"
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn the_capability_filter_skips_targets_with_a_stated_reason() {
    let mesh = Mesh::start(&["fake"], |config| {
        let small = TargetConfig {
            context_window: Some(50),
            tools: false,
            ..TargetConfig::new("fake", "small")
        };
        let big = TargetConfig {
            context_window: Some(100_000),
            ..TargetConfig::new("fake", "big")
        };
        config.routes = vec![
            RouteConfig::new("chat", vec![small.clone(), big]),
            RouteConfig::new("small-only", vec![small]),
        ];
    })
    .await;
    let long = "lorem ipsum ".repeat(100);
    let info = mesh
        .route(chat("chat", &long))
        .await
        .unwrap()
        .route
        .unwrap();
    assert_eq!(
        attempts(&info),
        strings(&[
            ("fake/small", "CONTEXT_WINDOW_TOO_SMALL", 0),
            ("fake/big", "", 200)
        ])
    );
    assert!(
        info.attempts[0]
            .error_message
            .contains("context window of 50")
    );
    assert_eq!(mesh.fake("fake").request_count("small"), 0);

    let info = mesh
        .route(chat("chat", "short"))
        .await
        .unwrap()
        .route
        .unwrap();
    assert_eq!(info.target, "fake/small");

    let mut with_tools = chat("chat", "short");
    with_tools.tools = vec![Tool {
        name: "f".into(),
        ..Tool::default()
    }];
    let info = mesh.route(with_tools).await.unwrap().route.unwrap();
    assert_eq!(
        attempts(&info),
        strings(&[("fake/small", "NO_TOOL_SUPPORT", 0), ("fake/big", "", 200)])
    );

    // No target can take it: the request's fault, not an outage.
    let status = mesh.route(chat("small-only", &long)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "INVALID_ARGUMENT");
    assert!(
        status.message().contains("CONTEXT_WINDOW_TOO_SMALL"),
        "{}",
        status.message()
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn metrics_count_requests_errors_latency_and_breaker_state_per_key() {
    let mesh = Mesh::start(&["fake"], |config| {
        config.metrics_addr = Some("127.0.0.1:0".to_owned());
        config.max_retries = 1;
        let mut keyed = TargetConfig::new("fake", "m");
        keyed.keys = vec![KeyConfig::new("team-a", "sk-secret-a")];
        config.routes = vec![
            RouteConfig::new("chat", vec![TargetConfig::new("fake", "n")]),
            RouteConfig::new("keyed", vec![keyed]),
        ];
    })
    .await;
    mesh.fake("fake").fail_next("n", 503, 1);
    mesh.route(chat("chat", "hi")).await.unwrap();
    mesh.route(chat("keyed", "hi")).await.unwrap();
    let url = format!("http://{}/metrics", mesh.metrics_addr.unwrap());
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let n = r#"target="fake/n",provider="fake",model="n",key="default""#;
    let m = r#"target="fake/m",provider="fake",model="m",key="team-a""#;
    for line in [
        format!("switchboard_router_requests_total{{{n}}} 2"),
        format!("switchboard_router_requests_total{{{m}}} 1"),
        format!("switchboard_router_errors_total{{{n},class=\"UPSTREAM_ERROR\"}} 1"),
        format!("switchboard_router_attempt_duration_seconds_count{{{n}}} 2"),
        format!("switchboard_router_attempt_duration_seconds_bucket{{{n},le=\"+Inf\"}} 2"),
        format!("switchboard_router_breaker_state{{{n}}} 0"),
        format!("switchboard_router_in_flight{{{m}}} 0"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    assert!(!text.contains("sk-secret"));
    mesh.shutdown().await;
}

#[tokio::test]
async fn each_key_is_sent_to_its_own_endpoint() {
    let mut second_endpoint = String::new();
    let mesh = Mesh::start(&["fake", "other"], |config| {
        second_endpoint = config.providers["other"].base_url.clone();
        let mut target = TargetConfig::new("fake", "m");
        let mut k2 = keyed("k2", 1);
        k2.base_url = Some(second_endpoint.clone());
        target.keys = vec![keyed("k1", 1), k2];
        config.routes = vec![RouteConfig::new("chat", vec![target])];
    })
    .await;
    let mut served = Vec::new();
    for _ in 0..2 {
        let info = mesh.route(chat("chat", "hi")).await.unwrap().route.unwrap();
        served.push(info.key_alias);
    }
    served.sort();
    assert_eq!(served, ["k1", "k2"]);
    // k1 went to the provider's own endpoint, k2 to its configured one.
    assert_eq!(mesh.fake("fake").request_count("m"), 1);
    assert_eq!(mesh.fake("other").request_count("m"), 1);
    let sent = mesh.fake("other").requests();
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer sk-k2"));
    mesh.shutdown().await;
}

/// A request one target's format cannot express (`n: 2` for Anthropic) skips that target with a
/// stated reason and goes to the next; only when no target can take it is it invalid, with the
/// first target's reason.
#[tokio::test]
async fn a_request_one_format_cannot_express_goes_to_the_next_target() {
    let mesh = Mesh::start(&["fake"], |config| {
        let root = config.providers["fake"]
            .base_url
            .trim_end_matches("/v1")
            .to_owned();
        config.providers.insert(
            "claude".to_owned(),
            ProviderConfig::of_kind(ProviderKind::Anthropic, root, Some("sk-claude")),
        );
        config.routes = vec![
            RouteConfig::new(
                "chat",
                vec![
                    TargetConfig::new("claude", "m"),
                    TargetConfig::new("fake", "m"),
                ],
            ),
            RouteConfig::new("claude-only", vec![TargetConfig::new("claude", "m")]),
        ];
    })
    .await;
    let two_choices = |route: &str| {
        let mut request = chat(route, "hi");
        request.sampling = Some(SamplingParams {
            n: Some(2),
            ..Default::default()
        });
        request
    };
    let info = mesh
        .route(two_choices("chat"))
        .await
        .unwrap()
        .route
        .unwrap();
    assert_eq!(
        attempts(&info),
        strings(&[("claude/m", "UNSUPPORTED_REQUEST", 0), ("fake/m", "", 200)])
    );
    assert!(
        info.attempts[0].error_message.contains("sampling.n"),
        "{}",
        info.attempts[0].error_message
    );
    // Streamed alike.
    let (chunks, info, error) = mesh.stream(two_choices("chat")).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    assert!(!chunks.is_empty());
    assert_eq!(info.unwrap().target, "fake/m");
    // No target can take it: invalid, naming the field as the first target did.
    let status = mesh.route(two_choices("claude-only")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_ARGUMENT");
    assert_eq!(status_metadata(&status)["field"], "request.sampling.n");
    assert!(
        status.message().contains("Anthropic generates one choice"),
        "{}",
        status.message()
    );
    mesh.shutdown().await;
}
