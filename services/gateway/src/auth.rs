//! Virtual API keys: configured as SHA-256 hashes, resolved to an app and a team, optionally
//! limited to some models and to a time (`expires_at`: refused from then on). The set is
//! replaced whole when the configuration is reloaded (`reload.rs`): a key added or revoked takes
//! effect without a restart.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use sha2::{Digest, Sha256};

use crate::{config::KeyConfig, error::GatewayError};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Key id (never the key).
    pub key_id: String,
    /// Application (tenant).
    pub app: String,
    /// Team.
    pub team: String,
    /// The models this key may call (`gateway.keys[].models`).
    pub models: ModelAccess,
    /// Tags added to each of the key's requests (`gateway.keys[].tags`).
    pub tags: Arc<[(String, String)]>,
}

/// Tag names the gateway itself sets (`switchboard.guard`); neither callers nor keys may.
pub const RESERVED_TAG_PREFIX: &str = "switchboard.";

/// A configured key: who it is, and until when it works.
#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    expires_at: Option<time::OffsetDateTime>,
}

/// Which models (routes, as clients name them) a key may call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelAccess {
    /// Exact names and prefixes (`"claude-*"`); `None`: every model.
    only: Option<Arc<[String]>>,
}

impl ModelAccess {
    /// From `gateway.keys[].models` (validated): empty means every model.
    pub fn new(models: &[String]) -> Self {
        ModelAccess {
            only: (!models.is_empty()).then(|| models.into()),
        }
    }

    /// Whether `model` may be called.
    pub fn allows(&self, model: &str) -> bool {
        let Some(patterns) = &self.only else {
            return true;
        };
        patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => pattern == model,
            })
    }

    /// The configured patterns, comma-separated (for error messages); `None` when unrestricted.
    pub fn describe(&self) -> Option<String> {
        self.only.as_ref().map(|patterns| patterns.join(", "))
    }
}

impl Principal {
    /// Adds the key's tags to a request's, overriding a caller's tag of the same name.
    pub fn apply_tags(&self, tags: &mut std::collections::HashMap<String, String>) {
        for (name, value) in self.tags.iter() {
            tags.insert(name.clone(), value.clone());
        }
    }

    /// Refuses a model this key may not call (a 403 that names the key id, the model and what
    /// the key may call; nothing is sent anywhere).
    pub fn check_model(&self, model: &str) -> Result<(), GatewayError> {
        if self.models.allows(model) {
            return Ok(());
        }
        tracing::info!(key_id = %self.key_id, model, "model not allowed for this key");
        Err(GatewayError::ModelNotAllowed {
            key_id: self.key_id.clone(),
            model: model.to_owned(),
            allowed: self.models.describe().unwrap_or_default(),
        })
    }
}

/// Hex SHA-256 of an API key, as configured in `gateway.keys[].sha256`.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

type ByHash = HashMap<[u8; 32], Entry>;

/// The configured keys, indexed by hash; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    by_hash: Arc<RwLock<ByHash>>,
}

impl KeyStore {
    /// Builds the store from validated configuration.
    pub fn new(keys: &[KeyConfig]) -> Self {
        KeyStore {
            by_hash: Arc::new(RwLock::new(index(keys))),
        }
    }

    /// Replaces every key with `keys` (validated configuration); returns how many there are now.
    /// A request already authenticated keeps its principal.
    pub fn replace(&self, keys: &[KeyConfig]) -> usize {
        let by_hash = index(keys);
        let count = by_hash.len();
        let previous = std::mem::replace(
            &mut *self.by_hash.write().unwrap_or_else(PoisonError::into_inner),
            by_hash,
        );
        // Freed after the lock is released.
        drop(previous);
        count
    }

    /// Resolves an `Authorization` header value (`Bearer <key>`).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, GatewayError> {
        let value = authorization
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or(GatewayError::MissingKey)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(GatewayError::MissingKey)?;
        self.resolve(key)
    }

    /// Resolves Anthropic-style credentials: the `x-api-key` header when present, else the
    /// `Authorization: Bearer` header.
    pub fn authenticate_api_key(
        &self,
        x_api_key: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Principal, GatewayError> {
        match x_api_key.map(str::trim).filter(|k| !k.is_empty()) {
            Some(key) => self.resolve(key),
            None => self.authenticate(authorization),
        }
    }

    fn resolve(&self, key: &str) -> Result<Principal, GatewayError> {
        self.resolve_at(key, time::OffsetDateTime::now_utc())
    }

    fn resolve_at(&self, key: &str, now: time::OffsetDateTime) -> Result<Principal, GatewayError> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let keys = self.by_hash.read().unwrap_or_else(PoisonError::into_inner);
        let entry = keys.get(&hash).ok_or(GatewayError::InvalidKey)?;
        if let Some(expires_at) = entry.expires_at
            && now >= expires_at
        {
            let key_id = entry.principal.key_id.clone();
            drop(keys);
            tracing::info!(%key_id, "expired key used");
            return Err(GatewayError::KeyExpired {
                key_id,
                expired_at: expires_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            });
        }
        Ok(entry.principal.clone())
    }
}

fn index(keys: &[KeyConfig]) -> ByHash {
    let mut by_hash = HashMap::with_capacity(keys.len());
    for key in keys {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(key.sha256.to_ascii_lowercase(), &mut hash).is_ok() {
            by_hash.insert(
                hash,
                Entry {
                    principal: Principal {
                        key_id: key.id.clone(),
                        app: key.app.clone(),
                        team: key.team.clone(),
                        models: ModelAccess::new(&key.models),
                        tags: key
                            .tags
                            .iter()
                            .map(|(name, value)| (name.clone(), value.clone()))
                            .collect(),
                    },
                    // Validated configuration: a bad time never gets here.
                    expires_at: key.expiry().ok().flatten(),
                },
            );
        }
    }
    by_hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        KeyStore::new(&[KeyConfig {
            id: "k1".into(),
            sha256: hash_api_key("sk-test"),
            app: "app1".into(),
            team: "team1".into(),
            models: Vec::new(),
            expires_at: None,
            tags: Default::default(),
        }])
    }

    #[test]
    fn model_access_is_exact_names_and_prefixes_and_empty_means_every_model() {
        let every = ModelAccess::new(&[]);
        assert!(every.allows("gpt-4o") && every.allows(""));
        assert_eq!(every.describe(), None);
        let some = ModelAccess::new(&["gpt-4o-mini".into(), "claude-*".into()]);
        assert!(some.allows("gpt-4o-mini"));
        assert!(some.allows("claude-sonnet-4") && some.allows("claude-"));
        assert!(!some.allows("gpt-4o"), "an exact name is not a prefix");
        assert!(
            !some.allows("gpt-4o-mini-2024"),
            "an exact name is not a prefix"
        );
        assert!(
            !some.allows("my-claude-3"),
            "a prefix matches at the start only"
        );
        assert_eq!(some.describe().as_deref(), Some("gpt-4o-mini, claude-*"));
        let principal = Principal {
            key_id: "k1".into(),
            app: "a".into(),
            team: String::new(),
            models: some,
            tags: Arc::new([]),
        };
        assert!(principal.check_model("claude-haiku").is_ok());
        let refused = principal.check_model("o3").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "key `k1` may not use model `o3` (it may use: gpt-4o-mini, claude-*)"
        );
    }

    #[test]
    fn an_expired_key_is_refused_from_its_expiry_on() {
        let store = KeyStore::new(&[KeyConfig {
            id: "k-exp".into(),
            sha256: hash_api_key("sk-exp"),
            app: "app1".into(),
            team: String::new(),
            models: Vec::new(),
            expires_at: Some("2027-01-01T00:00:00Z".into()),
            tags: Default::default(),
        }]);
        let at = |text: &str| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let before = store
            .resolve_at("sk-exp", at("2026-12-31T23:59:59Z"))
            .unwrap();
        assert_eq!(before.key_id, "k-exp");
        for now in ["2027-01-01T00:00:00Z", "2027-06-01T00:00:00Z"] {
            let error = store.resolve_at("sk-exp", at(now)).unwrap_err();
            assert!(
                matches!(error, GatewayError::KeyExpired { .. }),
                "{error:?}"
            );
            assert_eq!(
                error.to_string(),
                "API key `k-exp` expired at 2027-01-01T00:00:00Z"
            );
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["error"]["type"], "authentication_error");
            assert_eq!(body["error"]["code"], "key_expired");
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        // A wrong key is still just invalid, whatever the time.
        assert!(matches!(
            store.resolve_at("sk-other", at("2030-01-01T00:00:00Z")),
            Err(GatewayError::InvalidKey)
        ));
        // On the real clock: a key that expired long ago, one that expires far ahead.
        let key = |secret: &str, at: &str| KeyConfig {
            id: secret.into(),
            sha256: hash_api_key(secret),
            app: "app1".into(),
            team: String::new(),
            models: Vec::new(),
            expires_at: Some(at.into()),
            tags: Default::default(),
        };
        let store = KeyStore::new(&[
            key("sk-old", "2000-01-01T00:00:00Z"),
            key("sk-new", "9999-01-01T00:00:00Z"),
        ]);
        assert!(matches!(
            store.authenticate(Some("Bearer sk-old")),
            Err(GatewayError::KeyExpired { .. })
        ));
        assert!(store.authenticate(Some("Bearer sk-new")).is_ok());
    }

    #[test]
    fn resolves_a_configured_key() {
        let principal = store().authenticate(Some("Bearer sk-test")).unwrap();
        assert_eq!(principal.app, "app1");
        assert_eq!(principal.key_id, "k1");
    }

    #[test]
    fn rejects_missing_and_wrong_keys() {
        assert!(matches!(
            store().authenticate(None),
            Err(GatewayError::MissingKey)
        ));
        assert!(matches!(
            store().authenticate(Some("Basic abc")),
            Err(GatewayError::MissingKey)
        ));
        assert!(matches!(
            store().authenticate(Some("Bearer ")),
            Err(GatewayError::MissingKey)
        ));
        assert!(matches!(
            store().authenticate(Some("Bearer sk-wrong")),
            Err(GatewayError::InvalidKey)
        ));
    }

    #[test]
    fn x_api_key_wins_over_authorization() {
        let store = store();
        assert_eq!(
            store
                .authenticate_api_key(Some("sk-test"), None)
                .unwrap()
                .key_id,
            "k1"
        );
        assert!(
            store
                .authenticate_api_key(None, Some("Bearer sk-test"))
                .is_ok()
        );
        assert!(matches!(
            store.authenticate_api_key(Some("sk-wrong"), Some("Bearer sk-test")),
            Err(GatewayError::InvalidKey)
        ));
        assert!(matches!(
            store.authenticate_api_key(Some(" "), None),
            Err(GatewayError::MissingKey)
        ));
    }
}
