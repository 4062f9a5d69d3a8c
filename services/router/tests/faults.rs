//! The fault suite: every failure a real provider produces, injected into the fake provider, and
//! what the router's client sees — the answer with its attempts (what the usage event carries), a
//! status with its attempt count, or a stream that ends with an explicit error after its first
//! chunk (never a clean finish).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Mesh, attempts, chat, reason};
use switchboard_fake_provider::Fault;
use switchboard_proto::chat::v1::FinishReason;
use switchboard_router::{ProviderConfig, RouteConfig, TargetConfig};
use switchboard_status::status_metadata;
use tonic::Code;

/// Model of the first target (on provider `primary`) and of the fallback (on `backup`).
const M: &str = "m";

#[derive(Clone, Copy)]
enum Mode {
    Unary,
    Stream,
}

enum Expect {
    /// Served; every attempt as (target, error code, HTTP status), the serving one last.
    Served(&'static [(&'static str, &'static str, u32)]),
    /// Served, and the answer's finish reason.
    Finished(FinishReason),
    /// A status before any chunk: gRPC code, `ErrorInfo.reason`, attempts in its metadata.
    Failed(Code, &'static str, usize),
    /// A stream that delivered chunks, then ended with this status whose `last_error` names the
    /// cause: never a clean finish, never a route info.
    Broken(Code, &'static str),
}

struct Case {
    name: &'static str,
    route: &'static str,
    mode: Mode,
    inject: &'static [(Fault, u32)],
    expect: Expect,
}

const fn case(
    name: &'static str,
    mode: Mode,
    inject: &'static [(Fault, u32)],
    expect: Expect,
) -> Case {
    Case {
        name,
        route: "chat",
        mode,
        inject,
        expect,
    }
}

use Expect::{Broken, Failed, Finished, Served};
use Mode::{Stream, Unary};

const CASES: &[Case] = &[
    case(
        "429 with Retry-After within the cap: wait, then the same target",
        Unary,
        &[(
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            1,
        )],
        Served(&[("primary/m", "RATE_LIMITED", 429), ("primary/m", "", 200)]),
    ),
    case(
        "429 with a Retry-After beyond the cap: the next target at once",
        Unary,
        &[(
            Fault::RateLimited {
                retry_after_secs: 60,
            },
            1,
        )],
        Served(&[("primary/m", "RATE_LIMITED", 429), ("backup/m", "", 200)]),
    ),
    case(
        "500: retried, then the next target",
        Unary,
        &[(Fault::Status { status: 500 }, 2)],
        Served(&[
            ("primary/m", "UPSTREAM_ERROR", 500),
            ("primary/m", "UPSTREAM_ERROR", 500),
            ("backup/m", "", 200),
        ]),
    ),
    case(
        "503 once: the retry serves",
        Unary,
        &[(Fault::Status { status: 503 }, 1)],
        Served(&[("primary/m", "UPSTREAM_ERROR", 503), ("primary/m", "", 200)]),
    ),
    case(
        "503 before a stream's first chunk: fail over freely",
        Stream,
        &[(Fault::Status { status: 503 }, 2)],
        Served(&[
            ("primary/m", "UPSTREAM_ERROR", 503),
            ("primary/m", "UPSTREAM_ERROR", 503),
            ("backup/m", "", 200),
        ]),
    ),
    Case {
        name: "connection refused: retried, then the next target",
        route: "refused",
        mode: Unary,
        inject: &[],
        expect: Served(&[
            ("down/m", "CONNECTION_ERROR", 0),
            ("down/m", "CONNECTION_ERROR", 0),
            ("backup/m", "", 200),
        ]),
    },
    case(
        "connection reset before any answer",
        Unary,
        &[(Fault::ConnectionReset, 2)],
        Served(&[
            ("primary/m", "CONNECTION_ERROR", 0),
            ("primary/m", "CONNECTION_ERROR", 0),
            ("backup/m", "", 200),
        ]),
    ),
    case(
        "connection reset before a stream's first chunk",
        Stream,
        &[(Fault::ConnectionReset, 1)],
        Served(&[("primary/m", "CONNECTION_ERROR", 0), ("primary/m", "", 200)]),
    ),
    case(
        "slow first byte past the attempt timeout",
        Unary,
        &[(Fault::SlowFirstByte { delay_ms: 3_000 }, 2)],
        Served(&[
            ("primary/m", "TIMEOUT", 0),
            ("primary/m", "TIMEOUT", 0),
            ("backup/m", "", 200),
        ]),
    ),
    case(
        "slow first byte of a stream",
        Stream,
        &[(Fault::SlowFirstByte { delay_ms: 3_000 }, 1)],
        Served(&[("primary/m", "TIMEOUT", 0), ("primary/m", "", 200)]),
    ),
    case(
        "a stream that only keeps its connection alive times out before its first chunk",
        Stream,
        &[(
            Fault::KeepAlive {
                interval_ms: 100,
                count: 20,
            },
            2,
        )],
        Served(&[
            ("primary/m", "TIMEOUT", 0),
            ("primary/m", "TIMEOUT", 0),
            ("backup/m", "", 200),
        ]),
    ),
    case(
        "a stream that stalls after its first chunks ends with an error",
        Stream,
        &[(Fault::StreamStall { after_chunks: 1 }, 1)],
        Broken(Code::Unavailable, "TIMEOUT"),
    ),
    case(
        "a stream cut without [DONE] after its first chunks ends with an error",
        Stream,
        &[(Fault::StreamCut { after_chunks: 2 }, 1)],
        Broken(Code::Unavailable, "STREAM_INTERRUPTED"),
    ),
    case(
        "a stream cut before its first chunk fails over",
        Stream,
        &[(Fault::StreamCut { after_chunks: 0 }, 1)],
        Served(&[
            ("primary/m", "STREAM_INTERRUPTED", 0),
            ("primary/m", "", 200),
        ]),
    ),
    case(
        "malformed JSON: not retried, the next target",
        Unary,
        &[(Fault::MalformedJson, 1)],
        Served(&[("primary/m", "PROTOCOL_ERROR", 0), ("backup/m", "", 200)]),
    ),
    case(
        "a malformed SSE line after the opening, before any content: the next target",
        Stream,
        &[(Fault::MalformedSse, 1)],
        Served(&[("primary/m", "PROTOCOL_ERROR", 0), ("backup/m", "", 200)]),
    ),
    case(
        "a stream cut after its opening chunk, before any content, fails over",
        Stream,
        &[(Fault::OpeningThenCut, 2)],
        Served(&[
            ("primary/m", "STREAM_INTERRUPTED", 0),
            ("primary/m", "STREAM_INTERRUPTED", 0),
            ("backup/m", "", 200),
        ]),
    ),
    case(
        "wrong content type: not retried, the next target",
        Unary,
        &[(Fault::WrongContentType, 1)],
        Served(&[("primary/m", "PROTOCOL_ERROR", 0), ("backup/m", "", 200)]),
    ),
    case(
        "wrong content type of a stream",
        Stream,
        &[(Fault::WrongContentType, 1)],
        Served(&[("primary/m", "PROTOCOL_ERROR", 0), ("backup/m", "", 200)]),
    ),
    case(
        "authentication error: no retry of that key, the next target",
        Unary,
        &[(Fault::Status { status: 401 }, 5)],
        Served(&[
            ("primary/m", "AUTHENTICATION_ERROR", 401),
            ("backup/m", "", 200),
        ]),
    ),
    Case {
        name: "context length exceeded: skip smaller windows, a larger-context target serves",
        route: "context",
        mode: Unary,
        inject: &[(Fault::ContextLengthExceeded, 1)],
        expect: Served(&[
            ("primary/m", "CONTEXT_LENGTH_EXCEEDED", 400),
            ("primary/small", "CONTEXT_WINDOW_TOO_SMALL", 0),
            ("backup/m", "", 200),
        ]),
    },
    Case {
        name: "context length exceeded on the only target: rejected, not an outage",
        route: "single",
        mode: Unary,
        inject: &[(Fault::ContextLengthExceeded, 1)],
        expect: Failed(Code::FailedPrecondition, "UPSTREAM_REJECTED", 1),
    },
    Case {
        name: "context length exceeded before a stream's first chunk on the only target",
        route: "single",
        mode: Stream,
        inject: &[(Fault::ContextLengthExceeded, 1)],
        expect: Failed(Code::FailedPrecondition, "UPSTREAM_REJECTED", 1),
    },
    case(
        "content filter on the prompt: rejected, no other target",
        Unary,
        &[(Fault::ContentFilter, 1)],
        Failed(Code::FailedPrecondition, "UPSTREAM_REJECTED", 1),
    ),
    case(
        "content filter cutting the answer: served, finish reason says so",
        Unary,
        &[(Fault::ContentFilterFinish, 1)],
        Finished(FinishReason::ContentFilter),
    ),
    case(
        "content filter cutting a streamed answer: served, finish reason says so",
        Stream,
        &[(Fault::ContentFilterFinish, 1)],
        Finished(FinishReason::ContentFilter),
    ),
    case(
        "every target fails: unavailable, with every attempt counted",
        Unary,
        &[(Fault::Status { status: 500 }, 2)],
        Failed(Code::Unavailable, "UPSTREAM_UNAVAILABLE", 4),
    ),
];

async fn mesh(case: &Case) -> Mesh {
    let everything_fails = matches!(case.expect, Failed(Code::Unavailable, ..));
    let mesh = Mesh::start(&["primary", "backup"], |config| {
        config.attempt_timeout_ms = 400;
        config.max_retry_after_ms = 2_000;
        config.providers.insert(
            "down".to_owned(),
            ProviderConfig::openai("http://127.0.0.1:1/v1", None),
        );
        let window = |provider: &str, model: &str, tokens: u32| TargetConfig {
            context_window: Some(tokens),
            ..TargetConfig::new(provider, model)
        };
        config.routes = vec![
            RouteConfig::new(
                "chat",
                vec![
                    TargetConfig::new("primary", M),
                    TargetConfig::new("backup", M),
                ],
            ),
            RouteConfig::new(
                "refused",
                vec![TargetConfig::new("down", M), TargetConfig::new("backup", M)],
            ),
            RouteConfig::new("single", vec![TargetConfig::new("primary", M)]),
            RouteConfig::new(
                "context",
                vec![
                    window("primary", M, 8_000),
                    window("primary", "small", 4_000),
                    window("backup", M, 128_000),
                ],
            ),
        ];
    })
    .await;
    for (fault, times) in case.inject {
        mesh.fake("primary").inject(M, fault.clone(), *times);
    }
    if everything_fails {
        mesh.fake("backup").fail_next(M, 502, 2);
    }
    mesh
}

fn strings(list: &[(&str, &str, u32)]) -> Vec<(String, String, u32)> {
    list.iter()
        .map(|(t, c, s)| ((*t).to_owned(), (*c).to_owned(), *s))
        .collect()
}

/// Checks one case; the failure message names what differed.
async fn run(case: &Case) -> Result<(), String> {
    let mesh = mesh(case).await;
    let request = chat(case.route, "one two three four five six");
    let outcome = match case.mode {
        Unary => match mesh.route(request).await {
            Ok(response) => {
                let finish = response.response.as_ref().unwrap().choices[0].finish_reason;
                Ok((response.route.unwrap(), finish, 0))
            }
            Err(status) => Err((status, 0)),
        },
        Stream => match mesh.stream(request).await {
            Err(status) => Err((status, 0)),
            Ok((chunks, info, error)) => {
                let finish = chunks
                    .iter()
                    .flat_map(|c| c.choices.iter().map(|d| d.finish_reason))
                    .find(|f| *f != 0)
                    .unwrap_or(0);
                match (info, error) {
                    (Some(info), None) => Ok((info, finish, chunks.len())),
                    (None, Some(status)) => Err((status, chunks.len())),
                    (info, error) => {
                        return Err(format!("route info {info:?} and error {error:?} together"));
                    }
                }
            }
        },
    };
    mesh.shutdown().await;
    match (&case.expect, outcome) {
        (Served(expected), Ok((info, _, _))) => {
            let got = attempts(&info);
            if got != strings(expected) {
                return Err(format!("attempts {got:?}"));
            }
            if info.attempt_count as usize != expected.len() {
                return Err(format!("attempt_count {}", info.attempt_count));
            }
        }
        (Finished(reason), Ok((info, finish, _))) => {
            if finish != *reason as i32 {
                return Err(format!(
                    "finish reason {finish}, attempts {:?}",
                    attempts(&info)
                ));
            }
        }
        (Failed(code, expected_reason, count), Err((status, 0))) => {
            let got = status_metadata(&status).get("attempts").cloned();
            if status.code() != *code
                || reason(&status) != *expected_reason
                || (*code != Code::FailedPrecondition && got != Some(count.to_string()))
            {
                return Err(format!("status {status:?}"));
            }
        }
        (Broken(code, cause), Err((status, chunks))) => {
            let last_error = status_metadata(&status)
                .get("last_error")
                .cloned()
                .unwrap_or_default();
            if chunks == 0 || status.code() != *code || !last_error.starts_with(cause) {
                return Err(format!("after {chunks} chunks: {status:?}"));
            }
        }
        (_, Ok((info, finish, chunks))) => {
            return Err(format!(
                "served after {chunks} chunks, finish {finish}, attempts {:?}",
                attempts(&info)
            ));
        }
        (_, Err((status, chunks))) => return Err(format!("after {chunks} chunks: {status:?}")),
    }
    Ok(())
}

#[tokio::test]
async fn fault_suite() {
    let mut failures = Vec::new();
    for case in CASES {
        if let Err(why) = run(case).await {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Every target that was sent said the prompt is too long, the rest were skipped as too small:
/// the caller gets the typed rejection (context length exceeded), not an outage, with every
/// attempt counted and the last target that said so.
#[tokio::test]
async fn a_prompt_too_long_for_every_target_is_rejected_not_unavailable() {
    let mesh = Mesh::start(&["primary", "backup"], |config| {
        let window = |provider: &str, model: &str, tokens: u32| TargetConfig {
            context_window: Some(tokens),
            ..TargetConfig::new(provider, model)
        };
        config.routes = vec![
            RouteConfig::new("single", vec![TargetConfig::new("primary", M)]),
            RouteConfig::new(
                "context",
                vec![
                    window("primary", M, 8_000),
                    window("primary", "small", 4_000),
                    window("backup", M, 128_000),
                ],
            ),
        ];
    })
    .await;
    mesh.fake("primary")
        .inject(M, Fault::ContextLengthExceeded, 1);
    let status = mesh
        .route(chat("single", "one two three"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_REJECTED");
    let metadata = status_metadata(&status);
    assert_eq!(metadata["cause"], "context_length_exceeded");
    assert_eq!(metadata["target"], "primary/m");
    assert_eq!(metadata["http_status"], "400");
    assert_eq!(metadata["attempts"], "1");
    assert_eq!(mesh.fake("primary").request_count(M), 1, "not retried");

    // Three targets: the first and the largest say context length, the middle one is skipped.
    mesh.fake("primary")
        .inject(M, Fault::ContextLengthExceeded, 1);
    mesh.fake("backup")
        .inject(M, Fault::ContextLengthExceeded, 1);
    let status = mesh
        .route(chat("context", "one two three"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let metadata = status_metadata(&status);
    assert_eq!(metadata["cause"], "context_length_exceeded");
    assert_eq!(metadata["target"], "backup/m");
    assert_eq!(metadata["attempts"], "3");
    assert!(
        status.message().contains("CONTEXT_WINDOW_TOO_SMALL"),
        "{}",
        status.message()
    );

    // A larger target that failed otherwise might have served: that is an outage.
    mesh.fake("primary")
        .inject(M, Fault::ContextLengthExceeded, 1);
    mesh.fake("backup").fail_next(M, 500, 2);
    let status = mesh
        .route(chat("context", "one two three"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    mesh.shutdown().await;
}

/// A stream that broke after its opening chunk (the role delta with empty content) had sent
/// nothing of the answer: the backup serves the whole stream, the broken attempt's held opening
/// chunk is dropped (no splice), and the backup's own opening chunk comes first, in order.
#[tokio::test]
async fn a_stream_broken_after_its_opening_chunk_is_served_whole_by_the_backup() {
    let mesh = Mesh::start(&["primary", "backup"], |config| {
        config.max_retries = 0;
        config.routes = vec![RouteConfig::new(
            "chat",
            vec![
                TargetConfig::new("primary", M),
                TargetConfig::new("backup", M),
            ],
        )];
    })
    .await;
    mesh.fake("primary").inject(M, Fault::OpeningThenCut, 1);
    let (chunks, info, error) = mesh.stream(chat("chat", "one two three")).await.unwrap();
    assert!(error.is_none(), "{error:?}");
    let info = info.unwrap();
    assert_eq!(
        attempts(&info),
        vec![
            ("primary/m".to_owned(), "STREAM_INTERRUPTED".to_owned(), 0),
            ("backup/m".to_owned(), String::new(), 200),
        ]
    );
    // One answer: every chunk from the backup's stream, its role delta first and only once.
    let id = &chunks[0].id;
    assert!(chunks.iter().all(|c| &c.id == id), "{chunks:?}");
    let roles: Vec<usize> = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.choices.iter().any(|d| d.role != 0))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(roles, [0]);
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|d| d.content.as_str()))
        .collect();
    assert_eq!(text, "echo: one two three");
    mesh.shutdown().await;
}
