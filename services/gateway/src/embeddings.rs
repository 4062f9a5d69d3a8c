//! Embeddings at the front door: `POST /v1/embeddings` (OpenAI's shape) and the input both front
//! ends hand to [`Pipeline::embed`](crate::pipeline::Pipeline::embed).
//!
//! `input` is a string or an array of strings (token arrays are refused: the guard checks text);
//! `encoding_format` `float` (default) or `base64` (little-endian f32, as OpenAI encodes it);
//! `dimensions` and `user` are passed to the provider. Answers are never cached.

use std::collections::HashMap;

use axum::{
    Json,
    body::Body,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_proto::router::v1::EmbedResponse;
use tracing::Instrument;

use crate::{
    app::Shared,
    error::GatewayError,
    http,
    openai::{self, SwitchboardInfo},
    pipeline::RequestContext,
};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// An embeddings request, whatever front end it came from.
#[derive(Debug, Clone, Default)]
pub struct EmbedInput {
    /// Route name.
    pub model: String,
    /// Texts to embed.
    pub inputs: Vec<String>,
    /// Requested vector size.
    pub dimensions: Option<u32>,
    /// End-user id for the provider.
    pub user: String,
    /// Caller metadata (accounting only).
    pub tags: HashMap<String, String>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest {
        field: field.into(),
        message: message.into(),
    }
}

impl EmbedInput {
    /// What every provider would reject anyway, with errors that name the field.
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.model.trim().is_empty() {
            return Err(invalid("model", "must not be empty"));
        }
        crate::pipeline::validate_tags(&self.tags)?;
        if self.inputs.is_empty() {
            return Err(invalid("input", "must contain at least one text"));
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(invalid(
                "input",
                format!("must not contain more than {MAX_INPUTS} texts"),
            ));
        }
        if let Some(index) = self.inputs.iter().position(String::is_empty) {
            return Err(invalid(format!("input[{index}]"), "must not be empty"));
        }
        if self.dimensions == Some(0) {
            return Err(invalid("dimensions", "must be at least 1"));
        }
        Ok(())
    }
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: Value,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

/// How vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

impl EmbeddingsRequest {
    /// The pipeline's input and the requested encoding.
    pub fn into_input(self) -> Result<(EmbedInput, Encoding), GatewayError> {
        let token_arrays = || {
            invalid(
                "input",
                "token arrays are not supported (the guard checks text): send a string or an \
                 array of strings (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)",
            )
        };
        let inputs = match self.input {
            Value::String(text) => vec![text],
            Value::Array(items) => {
                let mut texts = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(text) => texts.push(text),
                        Value::Number(_) | Value::Array(_) => return Err(token_arrays()),
                        _ => return Err(invalid("input", "expected strings")),
                    }
                }
                texts
            }
            _ => return Err(invalid("input", "expected a string or an array of strings")),
        };
        let encoding = match self.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(invalid(
                    "encoding_format",
                    format!("unknown encoding `{other}`; expected float or base64"),
                ));
            }
        };
        Ok((
            EmbedInput {
                model: self.model,
                inputs,
                dimensions: self.dimensions,
                user: self.user.unwrap_or_default(),
                tags: self.metadata.unwrap_or_default(),
            },
            encoding,
        ))
    }
}

/// The OpenAI embeddings list.
#[derive(Debug, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<EmbeddingOut>,
    pub model: String,
    pub usage: UsageOut,
    /// Switchboard's extension: which target served.
    pub switchboard: SwitchboardInfo,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingOut {
    pub object: &'static str,
    pub index: u32,
    pub embedding: Vector,
}

/// Floats, or their base64 encoding.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// Standard base64 (with padding) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The little-endian f32 bytes of `values`, base64-encoded (OpenAI's `encoding_format: base64`).
pub fn encode_vector(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64(&bytes)
}

impl EmbeddingList {
    pub fn from_proto(
        response: EmbedResponse,
        encoding: Encoding,
        info: SwitchboardInfo,
    ) -> EmbeddingList {
        let usage = response.usage.unwrap_or_default();
        EmbeddingList {
            object: "list",
            data: response
                .embeddings
                .into_iter()
                .map(|e| EmbeddingOut {
                    object: "embedding",
                    index: e.index,
                    embedding: match encoding {
                        Encoding::Float => Vector::Float(e.values),
                        Encoding::Base64 => Vector::Base64(encode_vector(&e.values)),
                    },
                })
                .collect(),
            model: response.model,
            usage: UsageOut {
                prompt_tokens: usage.prompt_tokens,
                total_tokens: usage.prompt_tokens,
            },
            switchboard: info,
        }
    }
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(shared): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let span = http::request_span("POST /v1/embeddings", &headers);
    let response = handle(shared, headers, body).instrument(span.clone()).await;
    span.record("http.status_code", response.status().as_u16());
    response
}

async fn handle(shared: Shared, headers: HeaderMap, body: Body) -> Response {
    let principal = match shared.keys.authenticate(http::authorization(&headers)) {
        Ok(principal) => principal,
        Err(error) => return error.into_response(),
    };
    let parsed = match http::read_body(body, shared.max_body_bytes, &headers)
        .await
        .and_then(|bytes| http::parse_json::<EmbeddingsRequest>(&bytes))
        .and_then(EmbeddingsRequest::into_input)
    {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let (input, encoding) = parsed;
    let ctx = RequestContext::new(principal);
    let span = tracing::Span::current();
    span.record("request.id", ctx.request_id.as_str());
    span.record("app.id", ctx.principal.app.as_str());
    match shared.pipeline.embed(&ctx, input).await {
        Ok(response) => {
            let route = response.route.clone();
            let info = openai::switchboard_info(&ctx.request_id, "bypass", route.as_ref());
            let mut out = Json(EmbeddingList::from_proto(response, encoding, info)).into_response();
            http::set_headers(out.headers_mut(), &ctx.request_id, "bypass", route.as_ref());
            out
        }
        Err(error) => {
            let mut out = error.into_response();
            http::put_request_id(out.headers_mut(), &ctx.request_id);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<(EmbedInput, Encoding), GatewayError> {
        http::parse_json::<EmbeddingsRequest>(json.as_bytes())?.into_input()
    }

    #[test]
    fn inputs_strings_and_refusals() {
        let (input, encoding) =
            parse(r#"{"model":"e","input":"hi","dimensions":8,"user":"u"}"#).unwrap();
        assert_eq!(input.inputs, ["hi"]);
        assert_eq!(input.dimensions, Some(8));
        assert_eq!(encoding, Encoding::Float);
        let (input, encoding) =
            parse(r#"{"model":"e","input":["a","b"],"encoding_format":"base64"}"#).unwrap();
        assert_eq!(input.inputs, ["a", "b"]);
        assert_eq!(encoding, Encoding::Base64);
        for (body, field) in [
            (r#"{"model":"e","input":[1,2,3]}"#, "input"),
            (r#"{"model":"e","input":[[1,2]]}"#, "input"),
            (
                r#"{"model":"e","input":"x","encoding_format":"hex"}"#,
                "encoding_format",
            ),
        ] {
            match parse(body) {
                Err(GatewayError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
                other => panic!("unexpected {other:?}"),
            }
        }
        let (empty, _) = parse(r#"{"model":"e","input":["a",""]}"#).unwrap();
        assert!(
            matches!(empty.validate(), Err(GatewayError::InvalidRequest { field, .. }) if field == "input[1]")
        );
        let (none, _) = parse(r#"{"model":"e","input":[]}"#).unwrap();
        assert!(none.validate().is_err());
    }

    #[test]
    fn base64_matches_openais_encoding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // 1.0f32 little-endian: 00 00 80 3f.
        assert_eq!(encode_vector(&[1.0]), "AACAPw==");
    }
}
