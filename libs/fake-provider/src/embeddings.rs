//! OpenAI embeddings (`POST /v1/embeddings`, Azure `POST /openai/deployments/{d}/embeddings`) and
//! Gemini `POST /v1beta/models/{model}:batchEmbedContents` (`{"requests":[{"model":"models/{model}",
//! "content":{"parts":[{"text"}]},"outputDimensionality"}]}` answered with
//! `{"embeddings":[{"values":[…]}]}`, no usage, as the real API).
//!
//! Deterministic: each input text gets a unit vector seeded by a hash of the text (the same text
//! always gets the same vector), of [`DEFAULT_DIMENSIONS`] or the requested `dimensions`. Usage:
//! `prompt_tokens` = the words of every input. Vectors are always floats. Faults that make sense
//! for a unary call apply (status, rate limit, reset, slow first byte, malformed JSON, wrong
//! content type, context length).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    ApiFormat, Fault, KEPT_REQUESTS, ReceivedRequest, Rejected, Shared, Socket,
    answer::{Prompt, word_count},
    header_map, with_type,
};

/// Vector size when the request asks none.
pub const DEFAULT_DIMENSIONS: usize = 32;

/// Largest `dimensions` accepted.
const MAX_DIMENSIONS: u64 = 4096;

/// The deterministic unit vector of `text`: FNV-1a seeds an xorshift generator.
pub fn vector(text: &str, dimensions: usize) -> Vec<f32> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    if state == 0 {
        state = 1;
    }
    let mut values: Vec<f64> = (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 0.0 {
        for v in &mut values {
            *v /= norm;
        }
    }
    values.into_iter().map(|v| v as f32).collect()
}

/// What an embeddings request asks: the model, the texts, the vector size.
struct Asked {
    model: String,
    inputs: Vec<String>,
    dimensions: usize,
}

fn dimensions_of(value: Option<&Value>) -> Result<usize, Rejected> {
    match value {
        None | Some(Value::Null) => Ok(DEFAULT_DIMENSIONS),
        Some(value) => value
            .as_u64()
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .map(|d| d as usize)
            .ok_or_else(|| Rejected::bad("dimensions must be between 1 and 4096")),
    }
}

/// A Gemini `batchEmbedContents` body for the path's `model`: every request names
/// `models/{model}` and has text parts; all ask the same `outputDimensionality`.
fn parse_gemini(
    headers: &HeaderMap,
    query: &str,
    model: String,
    body: &Value,
) -> Result<Asked, Rejected> {
    crate::gemini::require_key(headers, query)?;
    let requests = body
        .get("requests")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            Rejected::bad("* BatchEmbedContentsRequest.requests: requests is not specified")
        })?;
    let name = format!("models/{model}");
    let mut inputs = Vec::with_capacity(requests.len());
    let mut dimensions = None;
    for (i, request) in requests.iter().enumerate() {
        if request.get("model").and_then(Value::as_str) != Some(name.as_str()) {
            return Err(Rejected::bad(format!(
                "* BatchEmbedContentsRequest.requests[{i}].model: the model must be `{name}`, as in the URL"
            )));
        }
        let text: String = request
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect();
        if text.is_empty() {
            return Err(Rejected::bad(format!(
                "* BatchEmbedContentsRequest.requests[{i}].content: contents are required"
            )));
        }
        inputs.push(text);
        let asked = dimensions_of(request.get("outputDimensionality"))?;
        if dimensions.is_some_and(|d| d != asked) {
            return Err(Rejected::bad(
                "outputDimensionality differs between requests",
            ));
        }
        dimensions = Some(asked);
    }
    Ok(Asked {
        model,
        inputs,
        dimensions: dimensions.unwrap_or(DEFAULT_DIMENSIONS),
    })
}

/// Handles one embeddings request; `path_model` is Azure's deployment or Gemini's path model,
/// `query` the query string (Gemini's `key=`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn handle(
    shared: Arc<Shared>,
    socket: Socket,
    format: ApiFormat,
    path_model: Option<String>,
    path: String,
    query: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return format.error(400, "could not parse the JSON body of your request");
        }
    };
    let Asked {
        model,
        inputs,
        dimensions,
    } = if format == ApiFormat::Gemini {
        match parse_gemini(&headers, query, path_model.unwrap_or_default(), &parsed) {
            Ok(asked) => asked,
            Err(rejected) => return format.error(rejected.status, &rejected.message),
        }
    } else {
        match parse_openai(path_model, &parsed) {
            Ok(asked) => asked,
            Err(rejected) => return format.error(rejected.status, &rejected.message),
        }
    };
    record_and_answer(
        shared, socket, format, model, inputs, dimensions, parsed, path, headers,
    )
    .await
}

/// An OpenAI / Azure body (Azure's model is its deployment).
fn parse_openai(deployment: Option<String>, parsed: &Value) -> Result<Asked, Rejected> {
    let Some(model) = deployment.or_else(|| {
        parsed
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }) else {
        return Err(Rejected::bad("you must provide a model parameter"));
    };
    let inputs: Vec<String> = match parsed.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) if !items.is_empty() => {
            match items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
            {
                Some(texts) => texts,
                None => return Err(Rejected::bad("'$.input' is invalid: expected strings")),
            }
        }
        _ => return Err(Rejected::bad("'$.input' is invalid")),
    };
    if inputs.iter().any(String::is_empty) {
        return Err(Rejected::bad(
            "'$.input' is invalid: empty strings are not allowed",
        ));
    }
    let dimensions = dimensions_of(parsed.get("dimensions"))?;
    Ok(Asked {
        model,
        inputs,
        dimensions,
    })
}

#[allow(clippy::too_many_arguments)]
async fn record_and_answer(
    shared: Arc<Shared>,
    socket: Socket,
    format: ApiFormat,
    model: String,
    inputs: Vec<String>,
    dimensions: usize,
    parsed: Value,
    path: String,
    headers: HeaderMap,
) -> Response {
    let (fault, latency) = {
        let mut inner = shared.lock();
        inner.models.insert(model.clone());
        if inner.requests.len() >= KEPT_REQUESTS {
            inner.requests.pop_front();
        }
        inner.requests.push_back(ReceivedRequest {
            model: model.clone(),
            body: parsed.clone(),
            stream: false,
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            format,
            path,
            headers: header_map(&headers),
        });
        *inner.counts.entry(model.clone()).or_default() += 1;
        let fault = inner.faults.get_mut(&model).and_then(VecDeque::pop_front);
        let latency = inner
            .latency
            .get(&model)
            .copied()
            .unwrap_or(shared.config.latency_ms);
        (fault, latency)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let prompt_tokens: u64 = inputs.iter().map(|t| word_count(t)).sum();
    match fault {
        Some(Fault::Status { status }) => {
            return format.error(status, &format!("injected failure with status {status}"));
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            return format.rate_limited(retry_after_secs);
        }
        Some(Fault::ConnectionReset) => {
            socket.reset();
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::SlowFirstByte { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        Some(Fault::MalformedJson) => {
            let cut = if format == ApiFormat::Gemini {
                "{\"embeddings\":[{\"values\":[0.1,"
            } else {
                "{\"object\":\"list\",\"data\":[{\"index\":0,\"embedding\":[0.1,"
            };
            return with_type(StatusCode::OK, "application/json", Body::from(cut));
        }
        Some(Fault::WrongContentType) => {
            return with_type(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Body::from("<html><body><h1>502 Bad Gateway</h1></body></html>"),
            );
        }
        Some(Fault::ContextLengthExceeded) => {
            let prompt = Prompt {
                model: model.clone(),
                prompt_words: prompt_tokens,
                ..Default::default()
            };
            return format.context_length_exceeded(&prompt);
        }
        _ => {}
    }
    if format == ApiFormat::Gemini {
        let embeddings: Vec<Value> = inputs
            .iter()
            .map(|text| json!({ "values": vector(text, dimensions) }))
            .collect();
        return Json(json!({ "embeddings": embeddings })).into_response();
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({ "object": "embedding", "index": index, "embedding": vector(text, dimensions) })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    }))
    .into_response()
}
