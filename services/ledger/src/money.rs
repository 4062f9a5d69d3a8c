//! Money without floats: prices are integer nano-USD per million tokens, costs integer nano-USD.

use std::fmt;

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;
/// Tokens a price is quoted for.
pub const TOKENS_PER_QUOTE: i128 = 1_000_000;
/// The largest accepted rate, USD per million tokens. Keeps every cost of a `u32`-token usage
/// inside an `i64` (2 × u32::MAX tokens × 1e15 nanos / 1e6 < i64::MAX).
pub const MAX_USD_PER_MTOK: i64 = 1_000_000;

/// Why a decimal price string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceParseError {
    /// Empty string.
    #[error("empty price")]
    Empty,
    /// A leading minus sign.
    #[error("price must not be negative")]
    Negative,
    /// More than nine digits after the decimal point (finer than a nano-USD).
    #[error("price has more than 9 decimals")]
    TooPrecise,
    /// Not `<digits>[.<digits>]`.
    #[error("price must be a decimal string like \"0.15\"")]
    Malformed,
    /// Above [`MAX_USD_PER_MTOK`].
    #[error("price exceeds {MAX_USD_PER_MTOK} USD per million tokens")]
    TooLarge,
}

/// A rate in nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rate(pub i64);

impl Rate {
    /// Parses a decimal USD-per-million-tokens string exactly ("0.15" → 150_000_000 nanos).
    pub fn parse(text: &str) -> Result<Rate, PriceParseError> {
        if text.is_empty() {
            return Err(PriceParseError::Empty);
        }
        if text.starts_with('-') {
            return Err(PriceParseError::Negative);
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PriceParseError::Malformed);
        }
        let fraction = fraction.unwrap_or("");
        if text.contains('.') && fraction.is_empty() {
            return Err(PriceParseError::Malformed);
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PriceParseError::Malformed);
        }
        if fraction.len() > 9 {
            return Err(PriceParseError::TooPrecise);
        }
        let whole = whole.trim_start_matches('0');
        // More than 7 significant integer digits is above the maximum whatever the digits.
        if whole.len() > 7 {
            return Err(PriceParseError::TooLarge);
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| PriceParseError::Malformed)?
        };
        let mut frac_nanos: i64 = 0;
        for (i, digit) in fraction.bytes().enumerate() {
            frac_nanos += i64::from(digit - b'0') * 10_i64.pow(8 - i as u32);
        }
        let nanos = whole * NANOS_PER_USD + frac_nanos;
        if nanos > MAX_USD_PER_MTOK * NANOS_PER_USD {
            return Err(PriceParseError::TooLarge);
        }
        Ok(Rate(nanos))
    }
}

impl fmt::Display for Rate {
    /// Exact decimal USD, trailing zeros trimmed ("0.15").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANOS_PER_USD;
        let frac = self.0 % NANOS_PER_USD;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// The three rates of one price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Uncached input tokens.
    pub input: Rate,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: Rate,
    /// Output tokens.
    pub output: Rate,
}

/// Token counts to price (OpenAI convention: `cached_prompt_tokens` is part of `prompt_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Input tokens, cached included.
    pub prompt: u32,
    /// Input tokens served from the provider's prompt cache.
    pub cached_prompt: u32,
    /// Output tokens.
    pub completion: u32,
}

impl Tokens {
    /// Whether nothing was consumed.
    pub fn is_zero(&self) -> bool {
        self.prompt == 0 && self.completion == 0 && self.cached_prompt == 0
    }
}

/// Cost overflowed `i64` (impossible for rates within [`MAX_USD_PER_MTOK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cost overflows 64 bits")]
pub struct CostOverflow;

/// Cost in nano-USD: `(prompt - cached) * input + cached * cached_input + completion * output`,
/// divided by one million with round-half-up, once. Cached tokens above `prompt` are clamped to
/// `prompt` (a malformed usage never yields a negative uncached count).
pub fn cost_nanos(tokens: Tokens, rates: Rates) -> Result<i64, CostOverflow> {
    let cached = tokens.cached_prompt.min(tokens.prompt);
    let uncached = tokens.prompt - cached;
    let total: i128 = i128::from(uncached) * i128::from(rates.input.0)
        + i128::from(cached) * i128::from(rates.cached_input.0)
        + i128::from(tokens.completion) * i128::from(rates.output.0);
    // All terms are non-negative, so half-up is add-half-then-truncate.
    let rounded = (total + TOKENS_PER_QUOTE / 2) / TOKENS_PER_QUOTE;
    i64::try_from(rounded).map_err(|_| CostOverflow)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rates(input: &str, cached: &str, output: &str) -> Rates {
        Rates {
            input: Rate::parse(input).unwrap(),
            cached_input: Rate::parse(cached).unwrap(),
            output: Rate::parse(output).unwrap(),
        }
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Rate::parse("0.15"), Ok(Rate(150_000_000)));
        assert_eq!(Rate::parse("0.075"), Ok(Rate(75_000_000)));
        assert_eq!(Rate::parse("2.50"), Ok(Rate(2_500_000_000)));
        assert_eq!(Rate::parse("10"), Ok(Rate(10_000_000_000)));
        assert_eq!(Rate::parse("0"), Ok(Rate(0)));
        assert_eq!(Rate::parse("0.000000001"), Ok(Rate(1)));
        assert_eq!(Rate::parse("007.5"), Ok(Rate(7_500_000_000)));
        assert_eq!(
            Rate::parse("1000000"),
            Ok(Rate(MAX_USD_PER_MTOK * NANOS_PER_USD))
        );
    }

    #[test]
    fn rejects_bad_prices() {
        assert_eq!(Rate::parse(""), Err(PriceParseError::Empty));
        assert_eq!(Rate::parse("-0.15"), Err(PriceParseError::Negative));
        assert_eq!(
            Rate::parse("0.0000000001"),
            Err(PriceParseError::TooPrecise)
        );
        assert_eq!(
            Rate::parse("1000000.000000001"),
            Err(PriceParseError::TooLarge)
        );
        assert_eq!(
            Rate::parse("99999999999999999999999"),
            Err(PriceParseError::TooLarge)
        );
        for bad in [
            ".5", "1.", "1e3", "+1", " 1", "1 ", "0x10", "1,5", "1.2.3", "NaN", "inf", ".",
        ] {
            assert_eq!(Rate::parse(bad), Err(PriceParseError::Malformed), "{bad}");
        }
    }

    #[test]
    fn displays_exactly() {
        assert_eq!(Rate(150_000_000).to_string(), "0.15");
        assert_eq!(Rate(10_000_000_000).to_string(), "10");
        assert_eq!(Rate(1).to_string(), "0.000000001");
    }

    #[test]
    fn cost_of_gpt_4o_mini() {
        // 1000 prompt (200 cached), 500 completion at 0.15 / 0.075 / 0.60 per million:
        // 800*150e6 + 200*75e6 + 500*600e6 = 120e9 + 15e9 + 300e9 = 435e9 → /1e6 = 435_000 nanos.
        let r = rates("0.15", "0.075", "0.60");
        let t = Tokens {
            prompt: 1000,
            cached_prompt: 200,
            completion: 500,
        };
        assert_eq!(cost_nanos(t, r), Ok(435_000));
    }

    #[test]
    fn rounds_half_up_once_per_row() {
        // 1 token at 0.0000005 USD/M = 500 nanos/M → 0.0005 nano → rounds to 0 … 0.5 rounds up.
        let r = rates("0.0005", "0", "0.0015");
        // 1 input token: 500_000 / 1e6 = 0.5 → 1.
        assert_eq!(
            cost_nanos(
                Tokens {
                    prompt: 1,
                    cached_prompt: 0,
                    completion: 0
                },
                r
            ),
            Ok(1)
        );
        // 1 output token: 1_500_000 / 1e6 = 1.5 → 2.
        assert_eq!(
            cost_nanos(
                Tokens {
                    prompt: 0,
                    cached_prompt: 0,
                    completion: 1
                },
                r
            ),
            Ok(2)
        );
        // Summed before rounding: 0.5 + 1.5 = 2.0 → 2 (rounding each term would give 3).
        assert_eq!(
            cost_nanos(
                Tokens {
                    prompt: 1,
                    cached_prompt: 0,
                    completion: 1
                },
                r
            ),
            Ok(2)
        );
        // Just below half rounds down.
        let r = rates("0.000499999", "0", "0");
        assert_eq!(
            cost_nanos(
                Tokens {
                    prompt: 1,
                    cached_prompt: 0,
                    completion: 0
                },
                r
            ),
            Ok(0)
        );
    }

    #[test]
    fn cached_tokens_are_inside_prompt_tokens_and_clamped() {
        let r = rates("1", "0.5", "2");
        let all_cached = Tokens {
            prompt: 1_000_000,
            cached_prompt: 1_000_000,
            completion: 0,
        };
        assert_eq!(cost_nanos(all_cached, r), Ok(500_000_000));
        let over = Tokens {
            prompt: 10,
            cached_prompt: 50,
            completion: 0,
        };
        assert_eq!(
            cost_nanos(over, r),
            cost_nanos(
                Tokens {
                    prompt: 10,
                    cached_prompt: 10,
                    completion: 0
                },
                r
            )
        );
    }

    #[test]
    fn maximum_rates_and_tokens_do_not_overflow() {
        let max = Rate(MAX_USD_PER_MTOK * NANOS_PER_USD);
        let r = Rates {
            input: max,
            cached_input: max,
            output: max,
        };
        let t = Tokens {
            prompt: u32::MAX,
            cached_prompt: 0,
            completion: u32::MAX,
        };
        assert!(cost_nanos(t, r).is_ok());
    }

    proptest! {
        #[test]
        fn parse_matches_integer_construction(whole in 0i64..=999_999, frac in 0i64..1_000_000_000, width in 1usize..=9) {
            // Build "<whole>.<frac truncated to width digits>" and the expected nanos from integers only.
            let digits = format!("{frac:09}");
            let shown = &digits[..width];
            let expected = whole * NANOS_PER_USD + shown.parse::<i64>().unwrap() * 10_i64.pow((9 - width) as u32);
            prop_assert_eq!(Rate::parse(&format!("{whole}.{shown}")), Ok(Rate(expected)));
        }

        #[test]
        fn display_round_trips(nanos in 0i64..=MAX_USD_PER_MTOK * NANOS_PER_USD) {
            prop_assert_eq!(Rate::parse(&Rate(nanos).to_string()), Ok(Rate(nanos)));
        }

        #[test]
        fn more_than_nine_decimals_is_rejected(whole in 0u32..1000, frac in "[0-9]{10,14}") {
            prop_assert_eq!(Rate::parse(&format!("{whole}.{frac}")), Err(PriceParseError::TooPrecise));
        }

        #[test]
        fn negatives_are_rejected(text in "-[0-9]{1,6}(\\.[0-9]{1,9})?") {
            prop_assert_eq!(Rate::parse(&text), Err(PriceParseError::Negative));
        }

        #[test]
        fn arbitrary_strings_never_panic(text in "\\PC{0,24}") {
            let _ = Rate::parse(&text);
        }

        #[test]
        fn cost_is_exact_half_up(
            prompt in any::<u32>(), cached in any::<u32>(), completion in any::<u32>(),
            input in 0i64..=MAX_USD_PER_MTOK * NANOS_PER_USD,
            cached_input in 0i64..=MAX_USD_PER_MTOK * NANOS_PER_USD,
            output in 0i64..=MAX_USD_PER_MTOK * NANOS_PER_USD,
        ) {
            let r = Rates { input: Rate(input), cached_input: Rate(cached_input), output: Rate(output) };
            let cost = cost_nanos(Tokens { prompt, cached_prompt: cached, completion }, r);
            prop_assert!(cost.is_ok());
            let cost = i128::from(cost.unwrap());
            let cached = cached.min(prompt);
            let exact = i128::from(prompt - cached) * i128::from(input)
                + i128::from(cached) * i128::from(cached_input)
                + i128::from(completion) * i128::from(output);
            // cost is the integer nearest exact/1e6, halves going up: cost - 1/2 <= exact/1e6 < cost + 1/2.
            prop_assert!(2 * exact >= (2 * cost - 1) * TOKENS_PER_QUOTE);
            prop_assert!(2 * exact < (2 * cost + 1) * TOKENS_PER_QUOTE);
        }

        #[test]
        fn cached_tokens_never_cost_more_when_cached_rate_is_lower(
            prompt in 0u32..10_000_000, cached_share in 0u32..=100, completion in 0u32..10_000_000,
        ) {
            let r = rates("0.15", "0.075", "0.60");
            let cached = (u64::from(prompt) * u64::from(cached_share) / 100) as u32;
            let with_cache = cost_nanos(Tokens { prompt, cached_prompt: cached, completion }, r).unwrap();
            let without = cost_nanos(Tokens { prompt, cached_prompt: 0, completion }, r).unwrap();
            prop_assert!(with_cache <= without);
        }
    }
}
