//! Embeddings: the provider adapters and the ordered fallback over a route's targets.
//!
//! - OpenAI and OpenAI-compatible servers: `POST {base}/embeddings`; Azure OpenAI:
//!   `POST {base}/openai/deployments/{deployment}/embeddings?api-version=…`. Vectors are always
//!   asked as floats (`encoding_format: "float"`); base64 is a front-door concern.
//! - Gemini: `POST {base}/{version}/models/{model}:batchEmbedContents`. Gemini reports no usage:
//!   prompt tokens are estimated (four characters a token).
//! - Anthropic has no embeddings API: its targets are skipped (`NO_EMBEDDINGS`).
//!
//! A route serves embeddings by walking its targets in configuration order (no strategy, rules or
//! capability filter); within a target, keys are picked as for chat (breaker, cooldown, budget),
//! retryable errors are retried with the route's backoff, an authentication error moves to the
//! next key, and a bad request stops at once. Errors use the chat taxonomy.

use std::{sync::atomic::AtomicUsize, time::Duration};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_proto::{
    chat::v1::{Attempt, RouteInfo, Usage},
    router::v1::{EmbedRequest, EmbedResponse, Embedding},
};
use tokio::time::Instant;
use tracing::{Instrument, Span, field::Empty};

use super::{
    Prepared, ProviderClient, ProviderError, TranslateError, openai::invalid, record_outcome,
};
use crate::{
    balance::{Pick, pick},
    config::ProviderKind,
    error::RouterError,
    routing::Routes,
};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// A provider's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per input, in input order.
    pub embeddings: Vec<Embedding>,
    /// The model, as the provider named it.
    pub model: String,
    /// Prompt tokens (reported, or estimated when the provider reports none).
    pub usage: Usage,
}

/// Four characters a token, for providers that report no usage and for key budgets.
fn estimate_tokens(request: &EmbedRequest) -> u32 {
    let chars: usize = request.inputs.iter().map(String::len).sum();
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

fn prompt_usage(tokens: u32) -> Usage {
    Usage {
        prompt_tokens: tokens,
        total_tokens: tokens,
        ..Default::default()
    }
}

/// The provider body for `request` sent to `model`.
pub fn to_provider_request(
    kind: ProviderKind,
    model: &str,
    request: &EmbedRequest,
) -> Result<Value, TranslateError> {
    match kind {
        ProviderKind::Openai | ProviderKind::Azure => {
            let mut body = Map::new();
            if kind == ProviderKind::Openai {
                body.insert("model".into(), json!(model));
            }
            body.insert("input".into(), json!(request.inputs));
            body.insert("encoding_format".into(), json!("float"));
            if let Some(dimensions) = request.dimensions {
                body.insert("dimensions".into(), json!(dimensions));
            }
            if !request.user.is_empty() {
                body.insert("user".into(), json!(request.user));
            }
            Ok(Value::Object(body))
        }
        ProviderKind::Gemini => {
            let name = format!("models/{model}");
            let requests: Vec<Value> = request
                .inputs
                .iter()
                .map(|text| {
                    let mut one =
                        json!({ "model": name, "content": { "parts": [{ "text": text }] } });
                    if let Some(dimensions) = request.dimensions {
                        one["outputDimensionality"] = json!(dimensions);
                    }
                    one
                })
                .collect();
            Ok(json!({ "requests": requests }))
        }
        ProviderKind::Anthropic => Err(invalid("model", "Anthropic has no embeddings API")),
    }
}

#[derive(Deserialize)]
struct OpenaiEmbeddings {
    data: Vec<OpenaiVector>,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Option<OpenaiUsage>,
}

#[derive(Deserialize)]
struct OpenaiVector {
    index: u32,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct OpenaiUsage {
    #[serde(default)]
    prompt_tokens: u32,
}

#[derive(Deserialize)]
struct GeminiEmbeddings {
    embeddings: Vec<GeminiVector>,
}

#[derive(Deserialize)]
struct GeminiVector {
    values: Vec<f32>,
}

/// Parses a successful answer of `kind` to a request of `inputs` texts.
pub fn parse_response(
    kind: ProviderKind,
    body: &[u8],
    request: &EmbedRequest,
    model: &str,
) -> Result<Embedded, ProviderError> {
    let protocol =
        |e: serde_json::Error| ProviderError::Protocol(format!("invalid embeddings: {e}"));
    let embedded = match kind {
        ProviderKind::Gemini => {
            let parsed: GeminiEmbeddings = serde_json::from_slice(body).map_err(protocol)?;
            Embedded {
                embeddings: parsed
                    .embeddings
                    .into_iter()
                    .enumerate()
                    .map(|(index, v)| Embedding {
                        index: index as u32,
                        values: v.values,
                    })
                    .collect(),
                model: model.to_owned(),
                usage: prompt_usage(estimate_tokens(request)),
            }
        }
        _ => {
            let parsed: OpenaiEmbeddings = serde_json::from_slice(body).map_err(protocol)?;
            let mut embeddings: Vec<Embedding> = parsed
                .data
                .into_iter()
                .map(|v| Embedding {
                    index: v.index,
                    values: v.embedding,
                })
                .collect();
            embeddings.sort_by_key(|e| e.index);
            let tokens = parsed
                .usage
                .map_or_else(|| estimate_tokens(request), |u| u.prompt_tokens);
            Embedded {
                embeddings,
                model: if parsed.model.is_empty() {
                    model.to_owned()
                } else {
                    parsed.model
                },
                usage: prompt_usage(tokens),
            }
        }
    };
    let in_order = embedded
        .embeddings
        .iter()
        .enumerate()
        .all(|(i, e)| e.index as usize == i);
    if embedded.embeddings.len() != request.inputs.len() || !in_order {
        return Err(ProviderError::Protocol(format!(
            "expected {} embeddings, got {}",
            request.inputs.len(),
            embedded.embeddings.len()
        )));
    }
    Ok(embedded)
}

impl ProviderClient {
    /// Whether this provider has an embeddings API.
    pub fn supports_embeddings(&self) -> bool {
        self.kind != ProviderKind::Anthropic
    }

    /// Translates `request` for provider model `model` (for Azure: the deployment).
    pub fn prepare_embeddings(
        &self,
        model: &str,
        request: &EmbedRequest,
    ) -> Result<Prepared, TranslateError> {
        Ok(Prepared {
            body: to_provider_request(self.kind, model, request)?,
            model: model.to_owned(),
            call: super::Call::Embeddings,
            call_tag: String::new(),
        })
    }

    pub(super) fn embeddings_url(&self, model: &str) -> Result<reqwest::Url, TranslateError> {
        let bad = |message: String| invalid("model", message);
        let mut url = self
            .base
            .clone()
            .map_err(|e| bad(format!("provider base URL is invalid: {e}")))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| bad("provider base URL cannot have a path".to_owned()))?;
            path.pop_if_empty();
            match self.kind {
                ProviderKind::Openai => {
                    path.push("embeddings");
                }
                ProviderKind::Azure => {
                    path.extend(["openai", "deployments", model, "embeddings"]);
                }
                ProviderKind::Gemini => {
                    let version = self.api_version.as_deref().unwrap_or("v1beta");
                    path.extend([version, "models", &format!("{model}:batchEmbedContents")]);
                }
                ProviderKind::Anthropic => {
                    return Err(bad("Anthropic has no embeddings API".to_owned()));
                }
            }
        }
        if self.kind == ProviderKind::Azure {
            let version = self.api_version.as_deref().unwrap_or_default();
            url.query_pairs_mut().append_pair("api-version", version);
        }
        Ok(url)
    }

    /// One embeddings attempt, bounded by `timeout`.
    pub async fn embed(
        &self,
        prepared: &Prepared,
        request: &EmbedRequest,
        timeout: Duration,
    ) -> Result<Embedded, ProviderError> {
        let span = tracing::info_span!(
            "provider.embeddings",
            otel.kind = "client",
            otel.status_code = Empty,
            provider = %self.name,
            gen_ai.system = self.kind.gen_ai_system(),
            gen_ai.operation.name = "embeddings",
            gen_ai.request.model = %prepared.model,
            gen_ai.response.model = Empty,
            inputs = request.inputs.len(),
            http.status_code = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
        );
        let attempt = async {
            let body = self.json_body(prepared).await?;
            parse_response(self.kind, &body, request, &prepared.model)
        };
        async {
            let result = tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or(Err(ProviderError::Timeout));
            record_outcome(
                &Span::current(),
                &result.as_ref().map(|r| (r.model.as_str(), Some(&r.usage))),
            );
            result
        }
        .instrument(span)
        .await
    }
}

fn attempt(
    deployment: &crate::balance::Deployment,
    started: Option<Instant>,
    error: Option<(&str, String, u16)>,
) -> Attempt {
    let (error_code, error_message, http_status) = match error {
        Some((code, message, status)) => (code.to_owned(), message, u32::from(status)),
        None => (String::new(), String::new(), 200),
    };
    Attempt {
        target: deployment.target.clone(),
        provider: deployment.provider.clone(),
        model: deployment.model.clone(),
        error_code,
        error_message,
        http_status,
        duration_ms: started.map_or(0, |s| s.elapsed().as_millis() as u64),
        ..Default::default()
    }
}

fn summary(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            if a.http_status == 0 {
                format!("{} {}", a.target, a.error_code)
            } else {
                format!("{} {} (HTTP {})", a.target, a.error_code, a.http_status)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn validate(request: &EmbedRequest) -> Result<(), RouterError> {
    let invalid = |field: String, message: &str| RouterError::InvalidArgument {
        field,
        message: message.to_owned(),
    };
    if request.inputs.is_empty() {
        return Err(invalid("inputs".to_owned(), "must not be empty"));
    }
    if request.inputs.len() > MAX_INPUTS {
        return Err(invalid(
            "inputs".to_owned(),
            "must not have more than 2048 texts",
        ));
    }
    if let Some(index) = request.inputs.iter().position(String::is_empty) {
        return Err(invalid(format!("inputs[{index}]"), "must not be empty"));
    }
    if request.dimensions == Some(0) {
        return Err(invalid("dimensions".to_owned(), "must be at least 1"));
    }
    Ok(())
}

/// Serves `request` through its route's targets in order. `deadline` is the overall deadline.
pub async fn embed(
    routes: &Routes,
    request: &EmbedRequest,
    deadline: Instant,
) -> Result<EmbedResponse, RouterError> {
    validate(request)?;
    let (targets, policy) = routes.embedding_targets(&request.model)?;
    let tokens = u64::from(estimate_tokens(request));
    let rotation = AtomicUsize::new(0);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut last_error: Option<ProviderError> = None;
    let deadline_exceeded =
        |attempts: &[Attempt], last: &Option<ProviderError>| RouterError::DeadlineExceeded {
            route: request.model.clone(),
            attempts: attempts.len(),
            last_error: last
                .as_ref()
                .map(|e| format!("{}: {e}", e.code()))
                .unwrap_or_default(),
        };
    'targets: for deployments in targets {
        let Some(first) = deployments.first() else {
            continue;
        };
        if !first.client.supports_embeddings() {
            attempts.push(attempt(
                first,
                None,
                Some(("NO_EMBEDDINGS", "skipped: no embeddings API".to_owned(), 0)),
            ));
            continue;
        }
        let mut excluded = 0u64;
        let mut retries = 0u32;
        let mut tried = false;
        loop {
            let (index, permit) =
                match pick(deployments, excluded, tokens, Instant::now(), &rotation) {
                    Pick::Ready { index, permit } => (index, permit),
                    Pick::Blocked { code, .. } => {
                        if !tried {
                            let message = format!("skipped: no usable key ({code})");
                            attempts.push(attempt(first, None, Some((code, message, 0))));
                        }
                        continue 'targets;
                    }
                };
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero());
            let Some(remaining) = remaining else {
                return Err(deadline_exceeded(&attempts, &last_error));
            };
            tried = true;
            let deployment = &*deployments[index];
            let prepared = deployment
                .client
                .prepare_embeddings(&deployment.model, request)
                .map_err(|e| RouterError::InvalidArgument {
                    field: format!("request.{}", e.field),
                    message: e.message,
                })?;
            deployment.metrics.request();
            let started = Instant::now();
            let result = deployment
                .client
                .embed(&prepared, request, remaining.min(policy.attempt_timeout))
                .await;
            deployment.metrics.latency(started.elapsed());
            let error = match result {
                Ok(embedded) => {
                    permit.finish(Instant::now(), Ok(()));
                    if let Some(budget) = &deployment.budget {
                        budget.settle(
                            Instant::now(),
                            tokens,
                            u64::from(embedded.usage.total_tokens),
                        );
                    }
                    let mut served = attempt(deployment, Some(started), None);
                    served.usage = Some(embedded.usage);
                    attempts.push(served);
                    let span = Span::current();
                    span.record("target", deployment.target.as_str());
                    span.record("attempts", attempts.len());
                    return Ok(EmbedResponse {
                        embeddings: embedded.embeddings,
                        model: embedded.model,
                        usage: Some(embedded.usage),
                        route: Some(RouteInfo {
                            route: request.model.clone(),
                            provider: deployment.provider.clone(),
                            model: deployment.model.clone(),
                            target: deployment.target.clone(),
                            attempt_count: attempts.len() as u32,
                            attempts,
                            ..Default::default()
                        }),
                    });
                }
                Err(error) => error,
            };
            deployment.metrics.error(error.code());
            permit.finish(Instant::now(), Err(&error));
            tracing::info!(
                target = %deployment.label,
                error.code = error.code(),
                http.status_code = error.http_status(),
                "embeddings attempt failed"
            );
            attempts.push(attempt(
                deployment,
                Some(started),
                Some((error.code(), error.to_string(), error.http_status())),
            ));
            if !error.allows_fallback() {
                let message = match &error {
                    ProviderError::BadRequest { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                return Err(RouterError::UpstreamRejected {
                    target: deployment.target.clone(),
                    key_alias: deployment.key_alias.clone(),
                    http_status: error.http_status(),
                    message,
                });
            }
            let retryable = error.is_retryable();
            let authentication = matches!(error, ProviderError::Authentication { .. });
            let timed_out = error == ProviderError::Timeout && remaining <= policy.attempt_timeout;
            let delay = policy.delay(retries + 1, &error);
            last_error = Some(error);
            if timed_out {
                return Err(deadline_exceeded(&attempts, &last_error));
            }
            if authentication && index < 64 {
                excluded |= 1 << index;
            } else if retryable && retries < policy.max_retries {
                retries += 1;
                if Instant::now() + delay >= deadline {
                    return Err(deadline_exceeded(&attempts, &last_error));
                }
                tokio::time::sleep(delay).await;
            } else {
                continue 'targets;
            }
        }
    }
    Span::current().record("attempts", attempts.len());
    let summary = summary(&attempts);
    if !attempts.is_empty() && attempts.iter().all(|a| a.error_code == "NO_EMBEDDINGS") {
        return Err(RouterError::NoCapableTarget {
            route: request.model.clone(),
            attempts: attempts.len(),
            summary,
        });
    }
    Err(RouterError::UpstreamUnavailable {
        route: request.model.clone(),
        attempts: attempts.len(),
        summary,
        last_error: last_error
            .map(|e| format!("{}: {e}", e.code()))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(inputs: &[&str]) -> EmbedRequest {
        EmbedRequest {
            model: "route".into(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            dimensions: Some(8),
            user: "u1".into(),
            caller: None,
        }
    }

    #[test]
    fn bodies_per_provider_kind() {
        let r = request(&["a", "b"]);
        let openai =
            to_provider_request(ProviderKind::Openai, "text-embedding-3-small", &r).unwrap();
        assert_eq!(
            openai,
            json!({"model":"text-embedding-3-small","input":["a","b"],"encoding_format":"float","dimensions":8,"user":"u1"})
        );
        let azure = to_provider_request(ProviderKind::Azure, "dep", &r).unwrap();
        assert!(azure.get("model").is_none());
        let gemini = to_provider_request(ProviderKind::Gemini, "text-embedding-004", &r).unwrap();
        assert_eq!(
            gemini["requests"][1],
            json!({"model":"models/text-embedding-004","content":{"parts":[{"text":"b"}]},"outputDimensionality":8})
        );
        assert!(to_provider_request(ProviderKind::Anthropic, "m", &r).is_err());
    }

    #[test]
    fn answers_parse_in_input_order_and_are_checked() {
        let r = request(&["a", "b"]);
        let body = br#"{"object":"list","model":"text-embedding-3-small","usage":{"prompt_tokens":2,"total_tokens":2},
            "data":[{"object":"embedding","index":1,"embedding":[0.0,1.0]},{"object":"embedding","index":0,"embedding":[1.0,0.0]}]}"#;
        let parsed = parse_response(ProviderKind::Openai, body, &r, "m").unwrap();
        assert_eq!(parsed.embeddings[0].values, [1.0, 0.0]);
        assert_eq!(parsed.embeddings[1].index, 1);
        assert_eq!(parsed.usage.prompt_tokens, 2);
        assert_eq!(parsed.usage.completion_tokens, 0);
        assert_eq!(parsed.model, "text-embedding-3-small");
        let short = br#"{"data":[{"index":0,"embedding":[1.0]}]}"#;
        assert_eq!(
            parse_response(ProviderKind::Openai, short, &r, "m")
                .unwrap_err()
                .code(),
            "PROTOCOL_ERROR"
        );
        let gemini = br#"{"embeddings":[{"values":[0.5]},{"values":[0.25]}]}"#;
        let parsed = parse_response(ProviderKind::Gemini, gemini, &r, "g").unwrap();
        assert_eq!(parsed.embeddings[1].values, [0.25]);
        assert_eq!(parsed.usage.prompt_tokens, 1, "estimated");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let field = |r: &EmbedRequest| match validate(r) {
            Err(RouterError::InvalidArgument { field, .. }) => field,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(field(&request(&[])), "inputs");
        assert_eq!(field(&request(&["a", ""])), "inputs[1]");
        let mut zero = request(&["a"]);
        zero.dimensions = Some(0);
        assert_eq!(field(&zero), "dimensions");
    }
}
