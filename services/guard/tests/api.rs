//! API tests: the real App on 127.0.0.1:0, called with the generated client.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use switchboard_guard::{App, AppPolicyConfig, Config};
use switchboard_proto::{
    chat::v1::{ContentPart, ImageUrl, Message, Role, ToolCall, content_part::Part},
    guard::v1::{
        CheckPromptRequest, CheckPromptResponse, Decision, guard_service_client::GuardServiceClient,
    },
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

const EMAIL: &str = "jane.doe@example.com";
const CARD: &str = "4111-1111-1111-1111";

struct Running {
    client: GuardServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), switchboard_guard::StartupError>>,
}

impl Running {
    async fn start(config: Config) -> Self {
        let app = App::build(config).await.unwrap();
        let url = switchboard_grpc::url_of(app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let client = GuardServiceClient::connect(url).await.unwrap();
        Running {
            client,
            stop: Some(stop),
            server,
        }
    }

    async fn check(&mut self, app: &str, messages: Vec<Message>) -> CheckPromptResponse {
        let request = CheckPromptRequest {
            request_id: "req-1".into(),
            app: app.into(),
            team: "t".into(),
            messages,
        };
        self.client
            .check_prompt(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

fn config() -> Config {
    Config {
        grpc_addr: "127.0.0.1:0".into(),
        apps: BTreeMap::from([
            (
                "billing".to_owned(),
                AppPolicyConfig {
                    action: Some("block".into()),
                    entities: None,
                },
            ),
            (
                "analytics".to_owned(),
                AppPolicyConfig {
                    action: Some("allow".into()),
                    entities: None,
                },
            ),
        ]),
        ..Config::default()
    }
}

fn prompt() -> Vec<Message> {
    let mut user = Message::text(Role::User, format!("I'm {EMAIL}; charge {CARD} please"));
    user.content.push(ContentPart {
        part: Some(Part::ImageUrl(ImageUrl {
            url: "https://example.com/receipt.png".into(),
            detail: String::new(),
        })),
    });
    let mut assistant = Message::text(Role::Assistant, format!("Emailing {EMAIL}"));
    assistant.tool_calls.push(ToolCall {
        id: "c1".into(),
        name: "send".into(),
        arguments_json: "{}".into(),
    });
    vec![
        Message::text(Role::System, "You are a billing assistant."),
        user,
        assistant,
    ]
}

fn assert_no_values(response: &CheckPromptResponse) {
    let debug = format!("{:?}", response.findings);
    assert!(!debug.contains(EMAIL) && !debug.contains("4111"), "{debug}");
}

#[tokio::test]
async fn default_policy_redacts_and_preserves_the_rest() {
    let mut guard = Running::start(config()).await;
    let input = prompt();
    let response = guard.check("web", input.clone()).await;
    assert_eq!(response.decision(), Decision::Transform);
    let findings: Vec<(&str, u32, &str)> = response
        .findings
        .iter()
        .map(|f| (f.entity_type.as_str(), f.count, f.action.as_str()))
        .collect();
    assert_eq!(
        findings,
        [("CREDIT_CARD", 1, "redact"), ("EMAIL_ADDRESS", 2, "redact")]
    );
    assert_no_values(&response);
    assert_eq!(response.messages.len(), 3);
    assert_eq!(response.messages[0], input[0]);
    assert_eq!(
        response.messages[1].joined_text(),
        "I'm [EMAIL_ADDRESS]; charge [CREDIT_CARD] please"
    );
    assert_eq!(response.messages[1].content[1], input[1].content[1]);
    assert_eq!(
        response.messages[2].joined_text(),
        "Emailing [EMAIL_ADDRESS]"
    );
    assert_eq!(response.messages[2].tool_calls, input[2].tool_calls);
    assert_eq!(response.policy_version.len(), 12);
    guard.stop().await;
}

#[tokio::test]
async fn per_app_policies_block_and_allow() {
    let mut guard = Running::start(config()).await;
    let default_version = guard.check("web", prompt()).await.policy_version;

    let blocked = guard.check("billing", prompt()).await;
    assert_eq!(blocked.decision(), Decision::Block);
    assert!(blocked.messages.is_empty());
    assert!(blocked.findings.iter().all(|f| f.action == "block"));
    assert_eq!(blocked.findings.len(), 2);
    assert_no_values(&blocked);
    assert_ne!(blocked.policy_version, default_version);

    let allowed = guard.check("analytics", prompt()).await;
    assert_eq!(allowed.decision(), Decision::Allow);
    assert!(allowed.messages.is_empty());
    assert!(allowed.findings.iter().all(|f| f.action == "allow"));
    assert_eq!(allowed.findings.iter().map(|f| f.count).sum::<u32>(), 3);
    assert_no_values(&allowed);
    guard.stop().await;
}

#[tokio::test]
async fn clean_prompts_are_allowed_unchanged() {
    let mut guard = Running::start(config()).await;
    let clean = vec![Message::text(
        Role::User,
        "Ping @support about order 1234-5678, not a@b",
    )];
    for app in ["web", "billing", "analytics"] {
        let response = guard.check(app, clean.clone()).await;
        assert_eq!(response.decision(), Decision::Allow, "{app}");
        assert!(
            response.messages.is_empty() && response.findings.is_empty(),
            "{app}"
        );
        assert!(!response.policy_version.is_empty());
    }
    guard.stop().await;
}

#[tokio::test]
async fn uninspectable_parts_are_invalid_arguments() {
    let mut guard = Running::start(config()).await;
    let mut message = Message::text(Role::User, "hi");
    message.content.push(ContentPart { part: None });
    let request = CheckPromptRequest {
        app: "web".into(),
        messages: vec![message],
        ..Default::default()
    };
    let status = guard.client.check_prompt(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        switchboard_status::status_metadata(&status)
            .get("field")
            .map(String::as_str),
        Some("messages[0].content[1]")
    );
    guard.stop().await;
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_build() {
    let mut config = config();
    config.apps.insert(
        "x".into(),
        AppPolicyConfig {
            action: Some("quarantine".into()),
            entities: None,
        },
    );
    let error = App::build(config).await.err().unwrap().to_string();
    assert!(error.contains("guard.apps.x.action"), "{error}");
}
