//! LiteLLM's price map (`model_prices_and_context_window.json`) parsed into price versions.
//!
//! Numbers are read as their JSON text (`serde_json::value::RawValue`) and converted with
//! [`parse_usd_per_token`], never through a float. A bad entry is reported with its JSON path and
//! does not stop the others.
//!
//! Mapping: a key `"<p>/<model>"` becomes provider `<p>` and model `<model>` (LiteLLM prefixes
//! non-default providers: `azure/gpt-4o`, `vertex_ai/gemini-2.5-pro`); an unprefixed key (the
//! model vendor's own entry: `gpt-4o-mini`, `claude-sonnet-4-5`) becomes provider `*`.
//! Fields: `input_cost_per_token`, `output_cost_per_token`, `cache_read_input_token_cost`
//! (default: input), `cache_creation_input_token_cost` (default: input),
//! `output_cost_per_reasoning_token` (default: output), one tier `*_above_<n>k_tokens` (the whole
//! request at the tier rates when prompt tokens exceed n·1000), `litellm_provider`, `mode`,
//! `max_input_tokens`. Batch, priority, flex, per-second, per-image, audio and 1-hour-cache prices
//! are not used (Switchboard does not send such requests).

use std::collections::{BTreeMap, HashMap};

use serde_json::value::RawValue;
use time::Date;

use crate::{
    money::{PriceParseError, Rate, Rates, Tier, parse_usd_per_token},
    pricing::{ANY_PROVIDER, Price, PriceSource},
    repo::ImportMeta,
};

/// One price version taken from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPrice {
    /// The entry's key.
    pub key: String,
    /// The version (source `litellm`).
    pub price: Price,
    /// LiteLLM's metadata.
    pub meta: ImportMeta,
}

/// An entry that could not be imported, or a field whose value was adjusted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Note {
    /// The entry's key.
    pub key: String,
    /// JSON path of the offending value, e.g. `$["gpt-4o"].input_cost_per_token`.
    pub path: String,
    /// What is wrong (or what was done).
    pub message: String,
}

/// The file, parsed.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// Entries in the file (the `sample_spec` documentation entry included).
    pub entries: usize,
    /// Valid token prices.
    pub prices: Vec<ImportedPrice>,
    /// Entries without a per-token price (images, audio, per-second), and the documentation entry.
    pub skipped: Vec<Note>,
    /// Entries with an invalid value.
    pub invalid: Vec<Note>,
    /// Values finer than 1e-15 USD per token, rounded half up (float printing artefacts).
    pub rounded: Vec<Note>,
}

/// The file is not a JSON object of entries at all.
#[derive(Debug, thiserror::Error)]
#[error("not a LiteLLM price map (a JSON object of model entries): {0}")]
pub struct FileError(#[from] serde_json::Error);

const TIERED: [&str; 5] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
];

/// Modes whose output is not billed per token (no `output_cost_per_token` means 0).
const INPUT_ONLY_MODES: [&str; 3] = ["embedding", "rerank", "moderation"];

fn path(key: &str, field: Option<&str>) -> String {
    let key = serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""));
    match field {
        Some(field) => format!("$[{key}].{field}"),
        None => format!("$[{key}]"),
    }
}

/// `(field, threshold in tokens)` of `<field>_above_<n>k_tokens`.
fn tier_field(name: &str) -> Option<(&'static str, u32)> {
    TIERED.iter().find_map(|field| {
        let n = name
            .strip_prefix(field)?
            .strip_prefix("_above_")?
            .strip_suffix("k_tokens")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let thousands: u32 = n.parse().ok()?;
        Some((*field, thousands.checked_mul(1000)?))
    })
}

/// Parses the file's text. Prices get `effective_from`.
pub fn parse(text: &str, effective_from: Date) -> Result<Parsed, FileError> {
    let entries: BTreeMap<String, &RawValue> = serde_json::from_str(text)?;
    let mut parsed = Parsed {
        entries: entries.len(),
        ..Parsed::default()
    };
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    for (key, raw) in entries {
        if key == "sample_spec" {
            parsed.skipped.push(Note {
                path: path(&key, None),
                key,
                message: "documentation entry".to_owned(),
            });
            continue;
        }
        match entry(&key, raw, effective_from, &mut parsed.rounded) {
            Ok(Some(imported)) => {
                let id = (
                    imported.price.provider.clone(),
                    imported.price.model.clone(),
                );
                if let Some(first) = seen.get(&id) {
                    parsed.invalid.push(Note {
                        path: path(&key, None),
                        message: format!(
                            "maps to provider {:?} model {:?} like {first:?}",
                            id.0, id.1
                        ),
                        key,
                    });
                } else {
                    seen.insert(id, key);
                    parsed.prices.push(imported);
                }
            }
            Ok(None) => parsed.skipped.push(Note {
                path: path(&key, None),
                key,
                message: "no per-token price".to_owned(),
            }),
            Err(note) => parsed.invalid.push(note),
        }
    }
    Ok(parsed)
}

fn entry(
    key: &str,
    raw: &RawValue,
    effective_from: Date,
    rounded: &mut Vec<Note>,
) -> Result<Option<ImportedPrice>, Note> {
    let invalid = |field: Option<&str>, message: String| Note {
        key: key.to_owned(),
        path: path(key, field),
        message,
    };
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| invalid(None, "entry is not a JSON object".to_owned()))?;
    let text = |field: &str| -> Result<Option<String>, Note> {
        match fields.get(field) {
            None => Ok(None),
            Some(value) => serde_json::from_str::<String>(value.get())
                .map(Some)
                .map_err(|_| invalid(Some(field), format!("not a string: {}", value.get()))),
        }
    };
    let mut rate = |field: &str| -> Result<Option<Rate>, Note> {
        let Some(value) = fields.get(field) else {
            return Ok(None);
        };
        let shown = value.get();
        match parse_usd_per_token(shown) {
            Ok(parsed) => {
                if parsed.rounded {
                    rounded.push(Note {
                        key: key.to_owned(),
                        path: path(key, Some(field)),
                        message: format!(
                            "{shown} USD per token is finer than 1e-15 USD; stored as {} USD per million tokens",
                            parsed.rate
                        ),
                    });
                }
                Ok(Some(parsed.rate))
            }
            Err(error) => {
                let why = match error {
                    PriceParseError::Malformed | PriceParseError::Empty => {
                        format!("not a number (USD per token): {shown}")
                    }
                    PriceParseError::TooLarge => {
                        format!("{shown} USD per token is above the 1 USD per token maximum")
                    }
                    other => format!("{other}: {shown}"),
                };
                Err(invalid(Some(field), why))
            }
        }
    };

    let litellm_provider = text("litellm_provider")?;
    let mode = text("mode")?;
    let max_input_tokens = match fields.get("max_input_tokens") {
        None => None,
        Some(value) => match serde_json::from_str::<Option<u32>>(value.get()) {
            Ok(tokens) => tokens.map(i64::from),
            Err(_) => {
                return Err(invalid(
                    Some("max_input_tokens"),
                    format!("not a token count: {}", value.get()),
                ));
            }
        },
    };

    let input = rate("input_cost_per_token")?;
    let output = rate("output_cost_per_token")?;
    let (input, output) = match (input, output) {
        (None, None) => return Ok(None),
        (Some(input), Some(output)) => (input, output),
        (Some(input), None)
            if mode
                .as_deref()
                .is_some_and(|m| INPUT_ONLY_MODES.contains(&m)) =>
        {
            (input, Rate(0))
        }
        (None, _) => {
            return Err(invalid(
                Some("input_cost_per_token"),
                "missing (output_cost_per_token is given)".to_owned(),
            ));
        }
        (Some(_), None) => {
            return Err(invalid(
                Some("output_cost_per_token"),
                format!(
                    "missing (input_cost_per_token is given, mode {:?})",
                    mode.as_deref().unwrap_or("")
                ),
            ));
        }
    };
    let cached_input = rate("cache_read_input_token_cost")?;
    let cache_write = rate("cache_creation_input_token_cost")?;
    let reasoning = rate("output_cost_per_reasoning_token")?;
    let rates = Rates {
        input,
        cached_input: cached_input.unwrap_or(input),
        cache_write: cache_write.unwrap_or(input),
        output,
        reasoning: reasoning.unwrap_or(output),
    };

    let mut thresholds: Vec<u32> = fields
        .keys()
        .filter_map(|f| tier_field(f))
        .map(|(_, t)| t)
        .collect();
    thresholds.sort_unstable();
    thresholds.dedup();
    let tier = match thresholds.as_slice() {
        [] => None,
        [above] => {
            // A class without a tier price keeps its base price when that was given, else it
            // follows the tier's input (cache reads and writes) or output (reasoning) price.
            let name = |field: &str| format!("{field}_above_{}k_tokens", above / 1000);
            let input = rate(&name("input_cost_per_token"))?.unwrap_or(rates.input);
            let output = rate(&name("output_cost_per_token"))?.unwrap_or(rates.output);
            Some(Tier {
                above_prompt_tokens: *above,
                rates: Rates {
                    input,
                    cached_input: rate(&name("cache_read_input_token_cost"))?
                        .or(cached_input)
                        .unwrap_or(input),
                    cache_write: rate(&name("cache_creation_input_token_cost"))?
                        .or(cache_write)
                        .unwrap_or(input),
                    output,
                    reasoning: rate(&name("output_cost_per_reasoning_token"))?
                        .or(reasoning)
                        .unwrap_or(output),
                },
            })
        }
        several => {
            let shown: Vec<String> = several.iter().map(|t| format!("{}k", t / 1000)).collect();
            return Err(invalid(
                None,
                format!(
                    "several prompt-size tiers ({}) are not supported; configure an override in [[ledger.prices]]",
                    shown.join(", ")
                ),
            ));
        }
    };

    let (provider, model) = match key.split_once('/') {
        Some((provider, model)) if !provider.is_empty() && !model.is_empty() => {
            (provider.to_owned(), model.to_owned())
        }
        Some(_) => {
            return Err(invalid(
                None,
                "key must be <model> or <provider>/<model>".to_owned(),
            ));
        }
        None => (ANY_PROVIDER.to_owned(), key.to_owned()),
    };
    if model.trim().is_empty() {
        return Err(invalid(None, "empty model name".to_owned()));
    }
    Ok(Some(ImportedPrice {
        key: key.to_owned(),
        price: Price {
            provider,
            model,
            effective_from,
            source: PriceSource::Litellm,
            rates,
            tier,
        },
        meta: ImportMeta {
            litellm_key: Some(key.to_owned()),
            litellm_provider,
            mode,
            max_input_tokens,
            import_id: None,
        },
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::date;

    const EXCERPT: &str = include_str!("../tests/fixtures/litellm_excerpt.json");

    fn parsed() -> Parsed {
        parse(EXCERPT, date!(2025 - 11 - 01)).unwrap()
    }

    fn find<'a>(parsed: &'a Parsed, key: &str) -> &'a ImportedPrice {
        parsed.prices.iter().find(|p| p.key == key).unwrap()
    }

    #[test]
    fn imports_every_token_class_exactly() {
        let parsed = parsed();
        assert_eq!(parsed.entries, 14);
        let mini = find(&parsed, "gpt-4o-mini");
        assert_eq!(
            (mini.price.provider.as_str(), mini.price.model.as_str()),
            ("*", "gpt-4o-mini")
        );
        assert_eq!(mini.price.source, PriceSource::Litellm);
        assert_eq!(mini.price.effective_from, date!(2025 - 11 - 01));
        assert_eq!(
            mini.price.rates,
            Rates {
                input: Rate(150_000_000),
                cached_input: Rate(75_000_000),
                cache_write: Rate(150_000_000),
                output: Rate(600_000_000),
                reasoning: Rate(600_000_000),
            }
        );
        assert_eq!(mini.meta.litellm_provider.as_deref(), Some("openai"));
        assert_eq!(mini.meta.mode.as_deref(), Some("chat"));
        assert_eq!(mini.meta.max_input_tokens, Some(128_000));

        let sonnet = find(&parsed, "claude-sonnet-4-5");
        assert_eq!(sonnet.price.rates.cache_write, Rate(3_750_000_000));
        assert_eq!(sonnet.price.rates.cached_input, Rate(300_000_000));
        assert_eq!(
            sonnet.price.tier, None,
            "the 1-hour cache price is not a tier"
        );

        let thinker = find(&parsed, "deep-thinker");
        assert_eq!(thinker.price.rates.reasoning, Rate(3_500_000_000));
        assert_eq!(thinker.price.rates.output, Rate(10_000_000_000));

        let embedding = find(&parsed, "text-embedding-3-small");
        assert_eq!(embedding.price.rates.input, Rate(20_000_000));
        assert_eq!(embedding.price.rates.output, Rate(0));
    }

    #[test]
    fn a_prefixed_key_names_the_provider_and_one_tier_is_kept() {
        let parsed = parsed();
        let gemini = find(&parsed, "vertex_ai/gemini-2.5-pro");
        assert_eq!(
            (gemini.price.provider.as_str(), gemini.price.model.as_str()),
            ("vertex_ai", "gemini-2.5-pro")
        );
        let tier = gemini.price.tier.unwrap();
        assert_eq!(tier.above_prompt_tokens, 200_000);
        assert_eq!(tier.rates.input, Rate(2_500_000_000));
        assert_eq!(tier.rates.cached_input, Rate(250_000_000));
        assert_eq!(tier.rates.output, Rate(15_000_000_000));
        // Not given at all: reasoning follows the tier's output, cache writes its input.
        assert_eq!(tier.rates.reasoning, Rate(15_000_000_000));
        assert_eq!(tier.rates.cache_write, Rate(2_500_000_000));
        assert_eq!(gemini.price.rates.cache_write, Rate(1_250_000_000));
    }

    #[test]
    fn bad_entries_are_reported_with_their_path_and_the_rest_imported() {
        let parsed = parsed();
        let invalid: Vec<(&str, &str)> = parsed
            .invalid
            .iter()
            .map(|n| (n.path.as_str(), n.message.as_str()))
            .collect();
        let has = |path: &str, words: &str| {
            assert!(
                invalid.iter().any(|(p, m)| *p == path && m.contains(words)),
                "{path} {words}: {invalid:?}"
            );
        };
        has(r#"$["bad/negative"].input_cost_per_token"#, "negative");
        has(
            r#"$["bad/string-price"].input_cost_per_token"#,
            "not a number",
        );
        has(
            r#"$["bad/missing-output"].output_cost_per_token"#,
            "missing",
        );
        has(
            r#"$["bad/two-tiers"]"#,
            "several prompt-size tiers (128k, 256k)",
        );
        has(r#"$["bad/context"].max_input_tokens"#, "not a token count");
        has(r#"$["bad/not-an-object"]"#, "not a JSON object");
        assert_eq!(parsed.invalid.len(), 6);
        let skipped: Vec<&str> = parsed.skipped.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(skipped, ["dall-e-3", "sample_spec"]);
        assert_eq!(parsed.prices.len(), 6);

        let artefact = find(&parsed, "novita/float-artefact");
        assert_eq!(artefact.price.rates.input, Rate(950_000_000));
        assert_eq!(artefact.price.rates.output, Rate(1_600_000_000));
        let rounded: Vec<&str> = parsed.rounded.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(
            rounded,
            [
                r#"$["novita/float-artefact"].input_cost_per_token"#,
                r#"$["novita/float-artefact"].output_cost_per_token"#
            ]
        );
    }

    #[test]
    fn a_file_that_is_not_an_object_is_an_error() {
        assert!(parse("[1, 2]", date!(2025 - 11 - 01)).is_err());
        assert!(parse("{", date!(2025 - 11 - 01)).is_err());
        assert_eq!(parse("{}", date!(2025 - 11 - 01)).unwrap().entries, 0);
    }
}
