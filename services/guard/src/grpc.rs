//! gRPC handlers: convert protobuf <-> domain and map errors.

use std::sync::Arc;

use switchboard_proto::guard::v1::{
    CheckPromptRequest, CheckPromptResponse, Decision as PbDecision, Finding as PbFinding,
    guard_service_server::GuardService,
};
use tonic::{Request, Response, Status};

use crate::guard::{Decision, Guard};

/// Error domain of the guard's statuses.
pub const DOMAIN: &str = "guard";

/// The `switchboard.guard.v1.GuardService` implementation.
pub struct GuardGrpc {
    guard: Arc<Guard>,
}

impl GuardGrpc {
    /// Serves `guard`.
    pub fn new(guard: Arc<Guard>) -> Self {
        GuardGrpc { guard }
    }
}

#[tonic::async_trait]
impl GuardService for GuardGrpc {
    async fn check_prompt(
        &self,
        request: Request<CheckPromptRequest>,
    ) -> Result<Response<CheckPromptResponse>, Status> {
        let request = request.into_inner();
        // The RPC's server span (`switchboard_telemetry::grpc_server_span`) takes the fields.
        tracing::Span::current()
            .record("request.id", request.request_id.as_str())
            .record("app.id", request.app.as_str());
        let outcome = self
            .guard
            .check(&request.app, &request.messages)
            .map_err(|error| switchboard_status::to_status(DOMAIN, &error))?;
        let decision = match outcome.decision {
            Decision::Allow => PbDecision::Allow,
            Decision::Transform => PbDecision::Transform,
            Decision::Block => PbDecision::Block,
        };
        // Entity types and counts only: never the text or a matched value.
        let summary: Vec<String> = outcome
            .findings
            .iter()
            .map(|f| format!("{}:{}", f.entity_type, f.count))
            .collect();
        let span = tracing::Span::current();
        span.record("decision", decision.as_str_name());
        span.record("findings", summary.join(","));
        tracing::debug!(
            decision = decision.as_str_name(),
            findings = %summary.join(","),
            policy_version = %outcome.policy_version,
            "prompt checked"
        );
        Ok(Response::new(CheckPromptResponse {
            decision: decision as i32,
            messages: outcome.messages,
            findings: outcome
                .findings
                .into_iter()
                .map(|f| PbFinding {
                    entity_type: f.entity_type.to_owned(),
                    count: f.count,
                    action: f.action.as_str().to_owned(),
                })
                .collect(),
            policy_version: outcome.policy_version,
        }))
    }
}
