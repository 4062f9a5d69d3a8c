//! gRPC handlers: convert protobuf <-> domain and map errors.

use std::sync::Arc;

use switchboard_proto::{
    chat::v1::Message,
    guard::v1::{
        CheckAnswerRequest, CheckAnswerResponse, CheckPromptRequest, CheckPromptResponse,
        Decision as PbDecision, Finding as PbFinding, Pseudonym as PbPseudonym,
        guard_service_server::GuardService,
    },
};
use tonic::{Request, Response, Status};

use crate::{
    admission::{Admission, Deadline},
    audit::{AuditSink, Subject},
    guard::{Decision, Guard},
    metrics::Metrics,
    policy::Direction,
};

/// Error domain of the guard's statuses.
pub const DOMAIN: &str = "guard";

/// The `switchboard.guard.v1.GuardService` implementation.
pub struct GuardGrpc {
    guard: Arc<Guard>,
    audit: Option<AuditSink>,
    admission: Admission,
    metrics: Arc<Metrics>,
}

impl GuardGrpc {
    /// Serves `guard`; every audited decision goes to `audit` when set; a call that waited past
    /// its admission deadline is refused (see [`crate::admission`]); every check is counted in
    /// `metrics`.
    pub fn new(
        guard: Arc<Guard>,
        audit: Option<AuditSink>,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> Self {
        GuardGrpc {
            guard,
            audit,
            admission,
            metrics,
        }
    }

    /// Refuses a call that waited too long for its turn.
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.admission
            .check_wait(request.extensions().get::<Deadline>())
            .map_err(|error| switchboard_status::to_status(DOMAIN, &error))
    }

    fn check(
        &self,
        subject: &Subject<'_>,
        messages: &[Message],
    ) -> Result<Response<CheckPromptResponse>, Status> {
        let &Subject {
            request_id,
            app,
            route,
            direction,
            ..
        } = subject;
        // The RPC's server span (`switchboard_telemetry::grpc_server_span`) takes the fields.
        let span = tracing::Span::current();
        span.record("request.id", request_id);
        span.record("app.id", app);
        let outcome = self
            .guard
            .check_route(app, route, direction, messages)
            .map_err(|error| {
                self.metrics.failed(direction);
                switchboard_status::to_status(DOMAIN, &error)
            })?;
        self.metrics.checked(direction, &outcome);
        if let Some(audit) = &self.audit {
            audit.record(subject, &outcome);
        }
        let decision = match outcome.decision {
            Decision::Allow => PbDecision::Allow,
            Decision::Transform => PbDecision::Transform,
            Decision::Block => PbDecision::Block,
        };
        // Entity types and counts only: never the text, a matched value or a pseudonym.
        let summary: Vec<String> = outcome
            .findings
            .iter()
            .map(|f| {
                format!(
                    "{}:{}:{}:{}",
                    f.kind.as_str(),
                    f.entity_type,
                    f.count,
                    f.action.as_str()
                )
            })
            .collect();
        span.record("decision", decision.as_str_name());
        span.record("findings", summary.join(","));
        tracing::debug!(
            decision = decision.as_str_name(),
            findings = %summary.join(","),
            pseudonyms = outcome.pseudonyms.len(),
            injection_score = outcome.injection_score,
            policy_version = %outcome.policy_version,
            detector_version = %outcome.detector_version,
            "{} checked",
            match direction {
                Direction::Prompt => "prompt",
                Direction::Answer => "answer",
            }
        );
        let pseudonyms = outcome
            .pseudonyms
            .pairs()
            .into_iter()
            .map(|(placeholder, value)| PbPseudonym {
                placeholder: placeholder.to_owned(),
                value: value.to_owned(),
            })
            .collect();
        Ok(Response::new(CheckPromptResponse {
            decision: decision as i32,
            messages: outcome.messages,
            findings: outcome
                .findings
                .into_iter()
                .map(|f| PbFinding {
                    entity_type: f.entity_type.into_owned(),
                    count: f.count,
                    action: f.action.as_str().to_owned(),
                    kind: f.kind.as_str().to_owned(),
                })
                .collect(),
            policy_version: outcome.policy_version,
            pseudonyms,
            injection_score: outcome.injection_score,
            detector_version: outcome.detector_version,
            check_answer: outcome.check_answer,
            prompt_passthrough: outcome.prompt_passthrough,
        }))
    }
}

#[tonic::async_trait]
impl GuardService for GuardGrpc {
    async fn check_prompt(
        &self,
        request: Request<CheckPromptRequest>,
    ) -> Result<Response<CheckPromptResponse>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        self.check(
            &Subject {
                request_id: &request.request_id,
                app: &request.app,
                team: &request.team,
                route: &request.route,
                direction: Direction::Prompt,
                sequence: 0,
            },
            &request.messages,
        )
    }

    async fn check_answer(
        &self,
        request: Request<CheckAnswerRequest>,
    ) -> Result<Response<CheckAnswerResponse>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        let checked = self
            .check(
                &Subject {
                    request_id: &request.request_id,
                    app: &request.app,
                    team: &request.team,
                    route: &request.route,
                    direction: Direction::Answer,
                    sequence: request.sequence,
                },
                &request.messages,
            )?
            .into_inner();
        Ok(Response::new(CheckAnswerResponse {
            decision: checked.decision,
            messages: checked.messages,
            findings: checked.findings,
            policy_version: checked.policy_version,
            detector_version: checked.detector_version,
        }))
    }
}
