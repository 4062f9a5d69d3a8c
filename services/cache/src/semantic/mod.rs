//! The semantic cache: a request whose final user message means the same as a cached one's, in
//! the same compatibility scope ([`ScopeKey`]), is served the cached answer.
//!
//! Lookup: exact key first (in [`crate::cache`]); on a miss, if the route (the requested model)
//! opts in, the final user message is embedded (micro-batched with concurrent lookups), the
//! scope's HNSW index returns the `top_k` nearest entries, and the best one whose similarity
//! reaches the route's threshold and that the near-miss guard ([`guard`]) lets through is served,
//! with its similarity. Store: the stored entry is indexed under its exact key.
//!
//! Only the final user message is embedded: everything before it (system prompt, earlier turns)
//! and every parameter is in the scope hash, so it must be identical anyway, and the last message
//! is what varies between paraphrased requests. Embedding the whole conversation would let a long
//! shared prefix drown a different question.

pub mod config;
pub mod eval;
pub mod guard;
pub mod index;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use switchboard_embed::{EmbedError, Embedder};
use switchboard_proto::chat::v1::ChatRequest;

pub use self::{
    config::{RouteConfig, SemanticConfig},
    guard::{Features, NearMiss},
    index::{SWEEP_INTERVAL, SemanticIndex, Swept},
};
use crate::key::{CacheKey, ScopeKey};

/// What an entry needs to be indexed: replicas that receive an entry with this tag index it
/// without embedding again ([`Semantic::on_insert`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticTag {
    /// The compatibility scope.
    pub scope: ScopeKey,
    /// The embedding of the final user message (L2-normalised).
    pub vector: Arc<[f32]>,
    /// The final user message (the near-miss guard compares it; never logged).
    pub text: String,
}

/// A semantic match: the entry to serve and how similar it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    /// The entry's exact key.
    pub key: CacheKey,
    /// Cosine similarity of the two final user messages.
    pub similarity: f32,
}

/// The verdict on one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Served.
    Hit,
    /// Below the route's threshold.
    BelowThreshold,
    /// Similar enough, but a near miss.
    NearMiss(NearMiss),
}

/// The decision rule, shared by lookups and the precision evaluation.
pub fn decide(
    route: &RouteConfig,
    similarity: f32,
    query: &Features,
    candidate: &Features,
) -> Verdict {
    if similarity < route.threshold {
        return Verdict::BelowThreshold;
    }
    if route.near_miss_guard
        && let Some(reason) = guard::near_miss(query, candidate)
    {
        return Verdict::NearMiss(reason);
    }
    Verdict::Hit
}

/// The model, the per-scope indexes and the per-route policy.
pub struct Semantic {
    config: SemanticConfig,
    embedder: Embedder,
    index: SemanticIndex,
}

impl Semantic {
    /// Loads the (process-wide) model when `config.enabled`; `None` when the semantic cache is off.
    pub async fn load(config: &SemanticConfig) -> Result<Option<Arc<Semantic>>, EmbedError> {
        if !config.enabled {
            return Ok(None);
        }
        let options = config.embed_options();
        let embedder = tokio::task::spawn_blocking(move || Embedder::shared(&options))
            .await
            .map_err(|_| EmbedError::WorkerGone)??;
        Ok(Some(Arc::new(Semantic::new(config.clone(), embedder))))
    }

    /// Over an already loaded model.
    pub fn new(config: SemanticConfig, embedder: Embedder) -> Self {
        let index = SemanticIndex::new(config.max_entries_per_scope);
        Semantic {
            config,
            embedder,
            index,
        }
    }

    /// The policy of `route` if it opts in.
    pub fn route(&self, route: &str) -> Option<&RouteConfig> {
        self.config.route(route)
    }

    /// The embedder (shared by every lookup and store).
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The index.
    pub fn index(&self) -> &SemanticIndex {
        &self.index
    }

    /// The entries that may answer `request`, best first: in its scope, at or above its route's
    /// threshold, and not near misses. Empty when the route does not opt in or the request has no
    /// final user text.
    pub async fn find(
        &self,
        app: &str,
        team: &str,
        request: &ChatRequest,
    ) -> Result<Vec<Match>, EmbedError> {
        let Some(route) = self.route(&request.model) else {
            return Ok(Vec::new());
        };
        let Some((scope, text)) = ScopeKey::of(app, team, request) else {
            return Ok(Vec::new());
        };
        let vector = self.embedder.embed(&text).await?;
        let candidates = self.index.search(scope, &vector, self.config.top_k);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let query = Features::of(&text);
        let mut matches = Vec::new();
        for candidate in candidates {
            match decide(route, candidate.similarity, &query, &candidate.features) {
                Verdict::Hit => matches.push(Match {
                    key: candidate.key,
                    similarity: candidate.similarity,
                }),
                Verdict::NearMiss(reason) => {
                    tracing::debug!(
                        scope = %scope.prefix(),
                        similarity = candidate.similarity,
                        reason = reason.as_str(),
                        "semantic near miss"
                    );
                }
                Verdict::BelowThreshold => {}
            }
        }
        Ok(matches)
    }

    /// The tag of `request` if its route opts in and it has a final user text (embeds it).
    pub async fn tag(
        &self,
        app: &str,
        team: &str,
        request: &ChatRequest,
    ) -> Result<Option<SemanticTag>, EmbedError> {
        if self.route(&request.model).is_none() {
            return Ok(None);
        }
        let Some((scope, text)) = ScopeKey::of(app, team, request) else {
            return Ok(None);
        };
        let vector = self.embedder.embed(&text).await?;
        Ok(Some(SemanticTag {
            scope,
            vector: vector.into(),
            text,
        }))
    }

    /// Indexes an entry stored (here or by another replica) with `tag`.
    pub fn on_insert(&self, app: &str, key: CacheKey, tag: &SemanticTag, expires_at: SystemTime) {
        self.index.insert(
            app,
            tag.scope,
            key,
            Arc::clone(&tag.vector),
            Arc::new(Features::of(&tag.text)),
            expires_at,
        );
    }

    /// Forgets an entry that was removed or replaced without a tag.
    pub fn on_remove(&self, key: CacheKey) {
        self.index.remove(key);
    }

    /// Forgets every entry of `app`; returns how many were indexed.
    pub fn on_purge(&self, app: &str) -> usize {
        self.index.purge_app(app)
    }

    /// Sweeps the index ([`SemanticIndex::sweep`]) every `every` until `cancel` fires: expired
    /// entries leave, emptied scopes are dropped. The cache `App` owns this task.
    pub async fn sweep_periodically(
        self: Arc<Self>,
        every: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        sweep_periodically(&self.index, every, cancel).await;
    }

    /// Embeds and indexes `request`'s answer stored under `key` for `ttl`. Returns the tag (for a
    /// shared store to replicate) or `None` when the route does not opt in.
    pub async fn index_stored(
        &self,
        app: &str,
        team: &str,
        request: &ChatRequest,
        key: CacheKey,
        ttl: Duration,
    ) -> Result<Option<SemanticTag>, EmbedError> {
        let Some(tag) = self.tag(app, team, request).await? else {
            return Ok(None);
        };
        let expires_at = SystemTime::now()
            .checked_add(ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.on_insert(app, key, &tag, expires_at);
        Ok(Some(tag))
    }
}

/// The loop of [`Semantic::sweep_periodically`], over any index.
pub(crate) async fn sweep_periodically(
    index: &SemanticIndex,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing can have expired yet.
    ticks.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let swept = index.sweep(SystemTime::now());
        if swept != Swept::default() {
            let (live, scopes) = index.len();
            tracing::debug!(
                expired = swept.entries,
                scopes_dropped = swept.scopes,
                live,
                scopes,
                "semantic index swept"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_comes_first_then_the_guard() {
        let route = RouteConfig {
            enabled: true,
            threshold: 0.9,
            near_miss_guard: true,
        };
        let (a, b) = (Features::of("enable 2FA"), Features::of("disable 2FA"));
        assert_eq!(decide(&route, 0.95, &a, &a), Verdict::Hit);
        assert_eq!(decide(&route, 0.89, &a, &a), Verdict::BelowThreshold);
        assert_eq!(
            decide(&route, 0.95, &a, &b),
            Verdict::NearMiss(NearMiss::Antonym)
        );
        let unguarded = RouteConfig {
            near_miss_guard: false,
            ..route
        };
        assert_eq!(decide(&unguarded, 0.95, &a, &b), Verdict::Hit);
    }
}
