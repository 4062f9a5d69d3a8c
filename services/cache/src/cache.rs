//! Exact-match lookups and stores: key computation, TTL policy and the completeness rule.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use switchboard_proto::chat::v1::{ChatRequest, ChatResponse, FinishReason, RouteInfo};

use crate::{
    config::Config,
    error::CacheError,
    key::CacheKey,
    semantic::Semantic,
    store::{CacheStore, Entry},
};

/// A cache hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The cached answer.
    pub response: ChatResponse,
    /// The route that produced it.
    pub route: Option<RouteInfo>,
    /// The guard policy the answer was checked under, as stored.
    pub guard_policy: String,
    /// Time since it was stored.
    pub age: Duration,
}

/// What a store is asked to keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// The answer (`None`: refused as [`Refusal::MissingResponse`]).
    pub response: Option<ChatResponse>,
    /// The route that produced it.
    pub route: Option<RouteInfo>,
    /// The guard policy it was checked under (opaque; kept and returned with every hit).
    pub guard_policy: String,
}

/// Why an answer was not stored: it is not a complete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No response was given.
    MissingResponse,
    /// The response has no choices.
    NoChoices,
    /// A choice did not finish naturally (truncated, tool calls, filtered, failed or unknown).
    Unfinished {
        index: usize,
        finish_reason: FinishReason,
    },
    /// A choice has no message.
    NoMessage { index: usize },
    /// A choice calls tools: its answer depends on what the tools return, which the key does not
    /// hold (also when it finished with `stop`, as OpenAI's does when `tool_choice` names the
    /// function).
    ToolCalls { index: usize },
    /// The response has no usage.
    MissingUsage,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::MissingResponse => f.write_str("no response"),
            Refusal::NoChoices => f.write_str("response has no choices"),
            Refusal::Unfinished {
                index,
                finish_reason,
            } => {
                write!(
                    f,
                    "choice {index} finished with {}, not FINISH_REASON_STOP",
                    finish_reason.as_str_name()
                )
            }
            Refusal::NoMessage { index } => write!(f, "choice {index} has no message"),
            Refusal::ToolCalls { index } => write!(f, "choice {index} calls tools"),
            Refusal::MissingUsage => f.write_str("response has no usage"),
        }
    }
}

/// The outcome of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Stored for this long.
    Yes { ttl: Duration },
    /// Refused.
    No(Refusal),
}

/// The exact-match cache over a [`CacheStore`].
pub struct Cache {
    store: Arc<dyn CacheStore>,
    default_ttl: Duration,
    max_ttl: Duration,
    semantic: Option<Arc<Semantic>>,
}

impl Cache {
    /// A cache with the TTL policy of `config` over `store`.
    pub fn new(config: &Config, store: Arc<dyn CacheStore>) -> Self {
        Cache {
            store,
            default_ttl: Duration::from_secs(config.default_ttl_secs),
            max_ttl: Duration::from_secs(config.max_ttl_secs),
            semantic: None,
        }
    }

    /// Adds the semantic layer (`None`: exact matches only).
    pub fn with_semantic(mut self, semantic: Option<Arc<Semantic>>) -> Self {
        self.semantic = semantic;
        self
    }

    /// After an exact miss: the best live entry of the request's scope (`app`, `team`, tags and
    /// the rest, [`crate::key::ScopeKey`]) whose final user message means the same (threshold and
    /// near-miss guard of its route), with its similarity. An embedding failure is logged and
    /// answered as a miss: the cache never fails a request for it.
    pub async fn lookup_semantic(
        &self,
        app: &str,
        team: &str,
        request: &ChatRequest,
    ) -> Result<Option<(Hit, f32)>, CacheError> {
        let Some(semantic) = &self.semantic else {
            return Ok(None);
        };
        let matches = match semantic.find(app, team, request).await {
            Ok(matches) => matches,
            Err(error) => {
                tracing::warn!(%error, "semantic lookup skipped");
                return Ok(None);
            }
        };
        for found in matches {
            match self.store.get(found.key).await? {
                Some(entry) => {
                    let hit = Hit {
                        age: entry.age(SystemTime::now()),
                        response: entry.response,
                        route: entry.route,
                        guard_policy: entry.guard_policy,
                    };
                    return Ok(Some((hit, found.similarity)));
                }
                // Evicted or expired in the store: forget it here too.
                None => semantic.on_remove(found.key),
            }
        }
        Ok(None)
    }

    /// After a store of `key` for `ttl`: indexes the entry when the request's route opts in to the
    /// semantic cache (failures are logged: the exact entry is stored either way).
    pub async fn index_semantic(
        &self,
        app: &str,
        team: &str,
        request: &ChatRequest,
        key: CacheKey,
        ttl: Duration,
    ) {
        let Some(semantic) = &self.semantic else {
            return;
        };
        match semantic.index_stored(app, team, request, key, ttl).await {
            // Other replicas index it from the shared store without embedding again.
            Ok(Some(tag)) => {
                let expires_at = SystemTime::now()
                    .checked_add(ttl)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                if let Err(error) = self.store.put_tag(app, key, &tag, expires_at).await {
                    tracing::warn!(%error, key = %key.prefix(), "semantic tag not shared");
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, key = %key.prefix(), "semantic indexing skipped");
            }
        }
    }

    /// The key of `request` of `team` in scope `app`; both the app and the model are required (the
    /// team may be empty).
    pub fn key(
        app: &str,
        team: &str,
        request: Option<&ChatRequest>,
    ) -> Result<CacheKey, CacheError> {
        if app.is_empty() {
            return Err(CacheError::Missing { field: "scope.app" });
        }
        let request = request.ok_or(CacheError::Missing { field: "request" })?;
        if request.model.is_empty() {
            return Err(CacheError::Missing {
                field: "request.model",
            });
        }
        Ok(CacheKey::of(app, team, request))
    }

    /// The store's figures for `/metrics`.
    pub fn store_stats(&self) -> crate::store::StoreStats {
        self.store.stats()
    }

    /// Looks `key` up.
    pub async fn lookup(&self, key: CacheKey) -> Result<Option<Hit>, CacheError> {
        let entry = self.store.get(key).await?;
        Ok(entry.map(|entry| Hit {
            age: entry.age(SystemTime::now()),
            response: entry.response,
            route: entry.route,
            guard_policy: entry.guard_policy,
        }))
    }

    /// Removes every entry of `app` (an erasure request); returns how many were removed.
    pub async fn purge(&self, app: &str) -> Result<u64, CacheError> {
        if app.is_empty() {
            return Err(CacheError::Missing { field: "scope.app" });
        }
        let removed = self.store.purge_app(app).await?;
        if let Some(semantic) = &self.semantic {
            semantic.on_purge(app);
        }
        Ok(removed)
    }

    /// Stores `answer` of scope `app` under `key` if it is a complete answer. `ttl_seconds` 0
    /// means the default; anything above the maximum is clamped to it.
    pub async fn store(
        &self,
        app: &str,
        key: CacheKey,
        answer: Answer,
        ttl_seconds: u32,
    ) -> Result<Stored, CacheError> {
        let Answer {
            response,
            route,
            guard_policy,
        } = answer;
        let response = match response {
            None => return Ok(Stored::No(Refusal::MissingResponse)),
            Some(response) => response,
        };
        if let Err(refusal) = check_complete(&response) {
            return Ok(Stored::No(refusal));
        }
        let ttl = self.ttl(ttl_seconds);
        self.store
            .put(
                key,
                Entry {
                    app: app.to_owned(),
                    response,
                    route,
                    guard_policy,
                    inserted_at: SystemTime::now(),
                    ttl,
                },
            )
            .await?;
        Ok(Stored::Yes { ttl })
    }

    fn ttl(&self, requested_seconds: u32) -> Duration {
        if requested_seconds == 0 {
            self.default_ttl
        } else {
            Duration::from_secs(u64::from(requested_seconds)).min(self.max_ttl)
        }
    }
}

/// A complete answer has choices, every one finished with STOP and carrying a message, and usage.
fn check_complete(response: &ChatResponse) -> Result<(), Refusal> {
    if response.choices.is_empty() {
        return Err(Refusal::NoChoices);
    }
    for (index, choice) in response.choices.iter().enumerate() {
        let finish_reason =
            FinishReason::try_from(choice.finish_reason).unwrap_or(FinishReason::Unspecified);
        if finish_reason != FinishReason::Stop {
            return Err(Refusal::Unfinished {
                index,
                finish_reason,
            });
        }
        match &choice.message {
            None => return Err(Refusal::NoMessage { index }),
            Some(message) if !message.tool_calls.is_empty() => {
                return Err(Refusal::ToolCalls { index });
            }
            Some(_) => {}
        }
    }
    if response.usage.is_none() {
        return Err(Refusal::MissingUsage);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use switchboard_proto::chat::v1::{Choice, Message, Role, Usage};

    fn cache() -> Cache {
        let config = Config {
            default_ttl_secs: 60,
            max_ttl_secs: 600,
            ..Config::default()
        };
        Cache::new(&config, Arc::new(MemoryStore::new(100)))
    }

    fn request() -> ChatRequest {
        ChatRequest {
            model: "fast".into(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        }
    }

    fn complete() -> ChatResponse {
        ChatResponse {
            id: "r1".into(),
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                message: Some(Message::text(Role::Assistant, "hello")),
                finish_reason: FinishReason::Stop as i32,
            }],
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                total_tokens: 2,
                ..Default::default()
            }),
            created: 1,
        }
    }

    #[test]
    fn ttl_defaults_and_clamps() {
        let cache = cache();
        assert_eq!(cache.ttl(0), Duration::from_secs(60));
        assert_eq!(cache.ttl(5), Duration::from_secs(5));
        assert_eq!(cache.ttl(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn keys_need_an_app_and_a_model() {
        assert!(matches!(
            Cache::key("", "t", Some(&request())),
            Err(CacheError::Missing { field: "scope.app" })
        ));
        assert!(matches!(
            Cache::key("a", "t", None),
            Err(CacheError::Missing { field: "request" })
        ));
        let no_model = ChatRequest {
            model: String::new(),
            ..request()
        };
        assert!(matches!(
            Cache::key("a", "t", Some(&no_model)),
            Err(CacheError::Missing {
                field: "request.model"
            })
        ));
    }

    #[tokio::test]
    async fn incomplete_answers_are_refused() {
        let cache = cache();
        let key = Cache::key("a", "t", Some(&request())).unwrap();
        let mut cases: Vec<(Option<ChatResponse>, Refusal)> =
            vec![(None, Refusal::MissingResponse)];
        cases.push((
            Some(ChatResponse {
                choices: vec![],
                ..complete()
            }),
            Refusal::NoChoices,
        ));
        for reason in [
            FinishReason::Length,
            FinishReason::ToolCalls,
            FinishReason::ContentFilter,
            FinishReason::Error,
            FinishReason::Unspecified,
        ] {
            let mut response = complete();
            let mut second = response.choices[0].clone();
            second.index = 1;
            second.finish_reason = reason as i32;
            response.choices.push(second);
            cases.push((
                Some(response),
                Refusal::Unfinished {
                    index: 1,
                    finish_reason: reason,
                },
            ));
        }
        let mut unknown = complete();
        unknown.choices[0].finish_reason = 99;
        cases.push((
            Some(unknown),
            Refusal::Unfinished {
                index: 0,
                finish_reason: FinishReason::Unspecified,
            },
        ));
        let mut no_message = complete();
        no_message.choices[0].message = None;
        cases.push((Some(no_message), Refusal::NoMessage { index: 0 }));
        // A forced tool call finishes with `stop` on OpenAI, and is still a tool call.
        let mut calls = complete();
        if let Some(message) = calls.choices[0].message.as_mut() {
            message
                .tool_calls
                .push(switchboard_proto::chat::v1::ToolCall {
                    id: "call_1".into(),
                    name: "lookup".into(),
                    arguments_json: "{}".into(),
                    ..Default::default()
                });
        }
        cases.push((Some(calls), Refusal::ToolCalls { index: 0 }));
        cases.push((
            Some(ChatResponse {
                usage: None,
                ..complete()
            }),
            Refusal::MissingUsage,
        ));

        for (response, refusal) in cases {
            let answer = Answer {
                response,
                ..Answer::default()
            };
            let outcome = cache.store("a", key, answer, 0).await.unwrap();
            assert_eq!(outcome, Stored::No(refusal.clone()));
            assert!(!refusal.to_string().is_empty());
            assert!(cache.lookup(key).await.unwrap().is_none(), "{refusal}");
        }
    }

    #[tokio::test]
    async fn complete_answers_are_stored_with_their_route_and_guard_policy() {
        let cache = cache();
        let key = Cache::key("a", "t", Some(&request())).unwrap();
        let route = RouteInfo {
            route: "fast".into(),
            provider: "p".into(),
            attempt_count: 1,
            ..Default::default()
        };
        let answer = Answer {
            response: Some(complete()),
            route: Some(route.clone()),
            guard_policy: "9f8e7d6c5b4a/d3-h1-x".into(),
        };
        let outcome = cache.store("a", key, answer, 0).await.unwrap();
        assert_eq!(
            outcome,
            Stored::Yes {
                ttl: Duration::from_secs(60)
            }
        );
        let hit = cache.lookup(key).await.unwrap().unwrap();
        assert_eq!(hit.response, complete());
        assert_eq!(hit.route, Some(route));
        assert_eq!(hit.guard_policy, "9f8e7d6c5b4a/d3-h1-x");

        // A newer answer checked under another policy replaces the entry, policy included (the
        // policy is not part of the key).
        let newer = Answer {
            response: Some(complete()),
            route: None,
            guard_policy: "0a0b0c0d0e0f/d3-h1-x".into(),
        };
        cache.store("a", key, newer, 0).await.unwrap();
        let hit = cache.lookup(key).await.unwrap().unwrap();
        assert_eq!(hit.guard_policy, "0a0b0c0d0e0f/d3-h1-x");
    }
}
