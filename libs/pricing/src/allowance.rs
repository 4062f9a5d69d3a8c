//! Budget spend with the ledger's cost rule (ADR 007): the price of a target as the ledger sends
//! it (`switchboard.ledger.v1.TargetPrice`), the upper-bound estimate of one attempt, and the true
//! cost of a usage. The gateway reserves and settles with these; the router checks each attempt.

use switchboard_proto::{
    chat::v1::Usage,
    ledger::v1::{TargetPrice, TokenRates},
};

use crate::{Pricing, Rate, Rates, Tier, Tokens};

fn rates(rates: Option<&TokenRates>) -> Rates {
    let r = rates.copied().unwrap_or_default();
    Rates {
        input: Rate(r.input.max(0)),
        cached_input: Rate(r.cached_input.max(0)),
        cache_write: Rate(r.cache_write.max(0)),
        output: Rate(r.output.max(0)),
        reasoning: Rate(r.reasoning.max(0)),
    }
}

/// The pricing a `TargetPrice` carries.
pub fn pricing_of(price: &TargetPrice) -> Pricing {
    Pricing {
        base: rates(price.base.as_ref()),
        tier: (price.tier_above_prompt_tokens > 0).then(|| Tier {
            above_prompt_tokens: price.tier_above_prompt_tokens,
            rates: rates(price.tier.as_ref()),
        }),
    }
}

/// The price of (provider, model) among `prices`.
pub fn find<'a>(prices: &'a [TargetPrice], provider: &str, model: &str) -> Option<&'a TargetPrice> {
    prices
        .iter()
        .find(|p| p.provider == provider && p.model == model)
}

/// Switchboard's usage as the tokens the cost rule prices.
pub fn tokens_of(usage: &Usage) -> Tokens {
    Tokens {
        prompt: usage.prompt_tokens,
        cached_prompt: usage.cached_prompt_tokens,
        cache_write: usage.cache_write_tokens,
        completion: usage.completion_tokens,
        reasoning: usage.reasoning_tokens,
    }
}

/// The true cost of `usage` (saturating at `i64::MAX` instead of overflowing).
pub fn cost(pricing: &Pricing, usage: &Usage) -> i64 {
    pricing.cost(tokens_of(usage)).unwrap_or(i64::MAX)
}

/// An upper bound of one attempt's cost: every prompt token uncached at the input rate (or the
/// cache-write rate when higher) and every output token at the higher of the output and reasoning
/// rates, at the tier the prompt size selects.
pub fn estimate(pricing: &Pricing, prompt_tokens: u32, max_output_tokens: u32) -> i64 {
    let probe = Tokens {
        prompt: prompt_tokens,
        completion: max_output_tokens,
        ..Tokens::default()
    };
    let r = pricing.rates_for(&probe);
    let worst = Rates {
        input: r.input.max(r.cache_write),
        output: r.output.max(r.reasoning),
        ..r
    };
    crate::cost_nanos(probe, worst).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn price(input: i64, output: i64) -> TargetPrice {
        TargetPrice {
            provider: "p".into(),
            model: "m".into(),
            base: Some(TokenRates {
                input,
                cached_input: input / 2,
                cache_write: input,
                output,
                reasoning: output,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_estimate_bounds_every_cost_of_at_most_those_tokens() {
        // 1 USD / 2 USD per million tokens.
        let pricing = pricing_of(&price(1_000_000_000, 2_000_000_000));
        let estimate = estimate(&pricing, 1000, 500);
        assert_eq!(estimate, 1000 * 1000 + 500 * 2000);
        for (prompt, cached, completion) in
            [(1000, 0, 500), (1000, 900, 500), (10, 0, 1), (0, 0, 0)]
        {
            let usage = Usage {
                prompt_tokens: prompt,
                cached_prompt_tokens: cached,
                completion_tokens: completion,
                ..Default::default()
            };
            assert!(cost(&pricing, &usage) <= estimate);
        }
        assert!(find(&[price(1, 1)], "p", "m").is_some());
        assert!(find(&[price(1, 1)], "p", "other").is_none());
    }
}
