//! The gateway's own gRPC API (`switchboard.gateway.v1.GatewayService`) answered directly by the
//! fake, with no mesh behind it: the benchmark's gRPC baseline (`docs/BENCHMARKS.md`). A gRPC
//! client of the gateway pays for protobuf, HTTP/2 and its own channel whichever server answers;
//! calling this server with the same client and the same request measures that cost, so that
//! gateway − this baseline is what the mesh adds. It serves on the same transport as the services
//! (`switchboard_grpc::serve`) and answers like the fake's chat formats: `"echo: " + last user
//! text`, usage in whitespace-separated words.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use switchboard_proto::{
    chat::v1::{
        ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceDelta, FinishReason, Message, Role,
        Usage,
    },
    gateway::v1::{
        CacheStatus, CreateChatCompletionRequest, CreateChatCompletionResponse,
        CreateEmbeddingsRequest, CreateEmbeddingsResponse, ListModelsRequest, ListModelsResponse,
        StreamChatCompletionRequest, StreamChatCompletionResponse, StreamSummary,
        gateway_service_server::{GatewayService, GatewayServiceServer},
        stream_chat_completion_response::Event,
    },
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Request, Response, Status};

use crate::answer::{Answer, Finish, Prompt, answer, split_pieces, word_count};

/// A running gateway-API server of the fake.
pub struct GatewayApi {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl GatewayApi {
    /// Serves the gateway API on `addr` (`127.0.0.1:0` picks a free port): every answer after
    /// `latency_ms`, a stream in `stream_chunks` content pieces.
    pub async fn start(addr: &str, latency_ms: u64, stream_chunks: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let service = GatewayServiceServer::new(Echo(Arc::new(Settings {
            latency: Duration::from_millis(latency_ms),
            stream_chunks: stream_chunks.max(1),
        })));
        let routes = tonic::service::Routes::new(service);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            let name = "switchboard.gateway.v1.GatewayService";
            if let Err(error) = switchboard_grpc::serve(listener, routes, &[name], shutdown).await {
                tracing::error!(%error, "fake gateway API failed");
            }
        });
        Ok(GatewayApi {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for in-flight calls.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

struct Settings {
    latency: Duration,
    stream_chunks: usize,
}

struct Echo(Arc<Settings>);

/// The provider-neutral prompt of a gateway request.
fn prompt_of(request: &ChatRequest) -> Result<Prompt, Status> {
    if request.messages.is_empty() {
        return Err(Status::invalid_argument("messages must not be empty"));
    }
    let mut prompt_words = 0;
    let mut last_user = String::new();
    for message in &request.messages {
        let text = message.joined_text();
        prompt_words += word_count(&text);
        if message.role == Role::User as i32 {
            last_user = text;
        }
    }
    Ok(Prompt {
        model: request.model.clone(),
        prompt_words,
        last_user,
        tools: request.tools.iter().map(|t| t.name.clone()).collect(),
        max_tokens: request
            .sampling
            .as_ref()
            .and_then(|s| s.max_tokens)
            .map(u64::from),
        ..Prompt::default()
    })
}

fn usage(prompt: u64, completion: u64) -> Usage {
    let prompt = u32::try_from(prompt).unwrap_or(u32::MAX);
    let completion = u32::try_from(completion).unwrap_or(u32::MAX);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        ..Usage::default()
    }
}

fn finish_reason(answer: &Answer) -> FinishReason {
    match answer {
        Answer::Text {
            finish: Finish::Stop | Finish::Refusal,
            ..
        } => FinishReason::Stop,
        Answer::Text {
            finish: Finish::Length,
            ..
        } => FinishReason::Length,
        Answer::Text {
            finish: Finish::ContentFilter,
            ..
        } => FinishReason::ContentFilter,
        Answer::ToolCalls(_) => FinishReason::ToolCalls,
    }
}

/// Whether the answer is a refusal (its text goes in `refusal`, not in the content).
fn refused(answer: &Answer) -> bool {
    matches!(
        answer,
        Answer::Text {
            finish: Finish::Refusal,
            ..
        }
    )
}

fn text_of(answer: &Answer) -> Result<&str, Status> {
    match answer {
        Answer::Text { content, .. } => Ok(content),
        Answer::ToolCalls(_) => Err(Status::unimplemented(
            "the fake's gateway API answers text only",
        )),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn checked(metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    if metadata.get("authorization").is_none() {
        return Err(Status::unauthenticated("missing authorization metadata"));
    }
    Ok(())
}

/// Checks the key, reads the chat request and computes the fake's answer to it.
fn answered(
    metadata: &tonic::metadata::MetadataMap,
    chat: Option<&ChatRequest>,
) -> Result<(Prompt, (Answer, u64, u64)), Status> {
    checked(metadata)?;
    let chat = chat.ok_or_else(|| Status::invalid_argument("request is required"))?;
    let prompt = prompt_of(chat)?;
    let answer = answer(&prompt);
    Ok((prompt, answer))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChatCompletionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GatewayService for Echo {
    async fn create_chat_completion(
        &self,
        request: Request<CreateChatCompletionRequest>,
    ) -> Result<Response<CreateChatCompletionResponse>, Status> {
        let (prompt, (answer, prompt_tokens, completion_tokens)) =
            answered(request.metadata(), request.get_ref().request.as_ref())?;
        if !self.0.latency.is_zero() {
            tokio::time::sleep(self.0.latency).await;
        }
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let text = text_of(&answer)?;
        let message = if refused(&answer) {
            Message {
                role: Role::Assistant as i32,
                refusal: text.to_owned(),
                ..Message::default()
            }
        } else {
            Message::text(Role::Assistant, text)
        };
        Ok(Response::new(CreateChatCompletionResponse {
            response: Some(ChatResponse {
                id: id.clone(),
                model: prompt.model,
                choices: vec![Choice {
                    index: 0,
                    message: Some(message),
                    finish_reason: finish_reason(&answer) as i32,
                }],
                usage: Some(usage(prompt_tokens, completion_tokens)),
                created: unix_now(),
            }),
            route: None,
            request_id: id,
            cache: CacheStatus::Miss as i32,
        }))
    }

    type StreamChatCompletionStream = ChunkStream;

    async fn stream_chat_completion(
        &self,
        request: Request<StreamChatCompletionRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (prompt, (answer, prompt_tokens, completion_tokens)) =
            answered(request.metadata(), request.get_ref().request.as_ref())?;
        let pieces = split_pieces(text_of(&answer)?, self.0.stream_chunks);
        let finish = finish_reason(&answer) as i32;
        let refusal = refused(&answer);
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let latency = self.0.latency;
        let model = prompt.model;
        let created = unix_now();
        let stream = async_stream::stream! {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let last = pieces.len().saturating_sub(1);
            for (i, piece) in pieces.into_iter().enumerate() {
                let (content, refusal) = if refusal {
                    (String::new(), piece)
                } else {
                    (piece, String::new())
                };
                let delta = ChoiceDelta {
                    index: 0,
                    role: if i == 0 { Role::Assistant as i32 } else { 0 },
                    content,
                    refusal,
                    finish_reason: if i == last { finish } else { 0 },
                    ..ChoiceDelta::default()
                };
                yield Ok(StreamChatCompletionResponse {
                    event: Some(Event::Chunk(ChatChunk {
                        id: id.clone(),
                        model: model.clone(),
                        choices: vec![delta],
                        usage: None,
                        created,
                    })),
                });
            }
            yield Ok(StreamChatCompletionResponse {
                event: Some(Event::Summary(StreamSummary {
                    usage: Some(usage(prompt_tokens, completion_tokens)),
                    route: None,
                    request_id: id,
                    cache: CacheStatus::Miss as i32,
                })),
            });
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake's gateway API serves chat completions only",
        ))
    }

    async fn create_embeddings(
        &self,
        _request: Request<CreateEmbeddingsRequest>,
    ) -> Result<Response<CreateEmbeddingsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake's gateway API serves chat completions only",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use switchboard_proto::{
        chat::v1::SamplingParams, gateway::v1::gateway_service_client::GatewayServiceClient,
    };

    use super::*;

    fn chat(text: &str, max_tokens: Option<u32>) -> ChatRequest {
        ChatRequest {
            model: "m".to_owned(),
            messages: vec![
                Message::text(Role::System, "be brief"),
                Message::text(Role::User, text),
            ],
            sampling: max_tokens.map(|m| SamplingParams {
                max_tokens: Some(m),
                ..SamplingParams::default()
            }),
            ..ChatRequest::default()
        }
    }

    fn authorized<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", "Bearer sk-test".parse().unwrap());
        request
    }

    async fn client(api: &GatewayApi) -> GatewayServiceClient<switchboard_grpc::ClientChannel> {
        let url = switchboard_grpc::url_of(api.addr());
        GatewayServiceClient::new(switchboard_grpc::client(&url).await.unwrap())
    }

    #[tokio::test]
    async fn the_gateway_api_echoes_the_last_user_message_with_word_usage() {
        let api = GatewayApi::start("127.0.0.1:0", 0, 5).await.unwrap();
        let mut client = client(&api).await;
        let response = client
            .create_chat_completion(authorized(CreateChatCompletionRequest {
                request: Some(chat("hello there", None)),
                cache: None,
            }))
            .await
            .unwrap()
            .into_inner();
        let reply = response.response.unwrap();
        assert_eq!(reply.model, "m");
        let choice = &reply.choices[0];
        assert_eq!(
            choice.message.as_ref().unwrap().joined_text(),
            "echo: hello there"
        );
        assert_eq!(choice.finish_reason, FinishReason::Stop as i32);
        let usage = reply.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (4, 3, 7)
        );

        let cut = client
            .create_chat_completion(authorized(CreateChatCompletionRequest {
                request: Some(chat("one two three four", Some(2))),
                cache: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .response
            .unwrap();
        assert_eq!(
            cut.choices[0].message.as_ref().unwrap().joined_text(),
            "echo: one"
        );
        assert_eq!(cut.choices[0].finish_reason, FinishReason::Length as i32);
        api.shutdown().await;
    }

    #[tokio::test]
    async fn the_gateway_api_rejects_a_call_without_a_key_or_messages() {
        let api = GatewayApi::start("127.0.0.1:0", 0, 5).await.unwrap();
        let mut client = client(&api).await;
        let unauthenticated = client
            .create_chat_completion(Request::new(CreateChatCompletionRequest {
                request: Some(chat("hi", None)),
                cache: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
        let empty = client
            .create_chat_completion(authorized(CreateChatCompletionRequest {
                request: Some(ChatRequest::default()),
                cache: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        api.shutdown().await;
    }

    #[tokio::test]
    async fn the_gateway_api_streams_the_answer_in_pieces_then_a_summary() {
        let api = GatewayApi::start("127.0.0.1:0", 0, 4).await.unwrap();
        let mut client = client(&api).await;
        let mut stream = client
            .stream_chat_completion(authorized(StreamChatCompletionRequest {
                request: Some(chat("a streamed answer of words", None)),
                cache: None,
            }))
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while let Some(message) = stream.message().await.unwrap() {
            events.push(message.event.unwrap());
        }
        let (last, chunks) = events.split_last().unwrap();
        assert_eq!(chunks.len(), 4, "stream_chunks content pieces");
        let text: String = chunks
            .iter()
            .map(|e| match e {
                Event::Chunk(c) => c.choices[0].content.clone(),
                Event::Summary(_) => panic!("a summary before the last event"),
            })
            .collect();
        assert_eq!(text, "echo: a streamed answer of words");
        let Event::Summary(summary) = last else {
            panic!("the stream does not end with a summary");
        };
        let usage = summary.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 6));
        api.shutdown().await;
    }
}
