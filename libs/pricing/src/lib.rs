//! Money without floats: prices are integer nano-USD per million tokens, costs integer nano-USD.
//! The one cost rule of Switchboard: the ledger records with it, the gateway estimates and settles
//! budget spend with it, the router checks each attempt against a spend allowance with it.

use std::fmt;

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;
/// Tokens a price is quoted for.
pub const TOKENS_PER_QUOTE: i128 = 1_000_000;
/// The largest accepted rate, USD per million tokens. Keeps every cost of a `u32`-token usage
/// inside an `i64` (2 × u32::MAX tokens × 1e15 nanos / 1e6 < i64::MAX).
pub const MAX_USD_PER_MTOK: i64 = 1_000_000;

/// Why a decimal price string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
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

/// The rates of one price, one per token class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Uncached input tokens.
    pub input: Rate,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: Rate,
    /// Input tokens written to the provider's prompt cache (Anthropic's cache creation).
    pub cache_write: Rate,
    /// Output tokens other than reasoning tokens.
    pub output: Rate,
    /// Output tokens spent on hidden reasoning.
    pub reasoning: Rate,
}

impl Rates {
    /// Rates where cache writes cost the input rate and reasoning the output rate.
    pub fn flat(input: Rate, cached_input: Rate, output: Rate) -> Rates {
        Rates {
            input,
            cached_input,
            cache_write: input,
            output,
            reasoning: output,
        }
    }
}

/// Rates that replace the base rates for a whole request whose prompt is larger than a threshold
/// (LiteLLM's `*_above_<n>k_tokens`, e.g. Gemini 2.5 Pro above 200k input tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// The tier applies when `prompt_tokens` (cached and cache writes included) exceeds this.
    pub above_prompt_tokens: u32,
    /// Rates of every token class of such a request.
    pub rates: Rates,
}

/// A price: base rates and at most one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    /// Rates below (or without) the tier threshold.
    pub base: Rates,
    /// The large-prompt tier, if any.
    pub tier: Option<Tier>,
}

impl Pricing {
    /// Untiered pricing.
    pub fn flat(base: Rates) -> Pricing {
        Pricing { base, tier: None }
    }

    /// The rates that apply to a request with these tokens.
    pub fn rates_for(&self, tokens: &Tokens) -> Rates {
        match self.tier {
            Some(tier) if tokens.prompt > tier.above_prompt_tokens => tier.rates,
            _ => self.base,
        }
    }

    /// Cost of a request in nano-USD (see [`cost_nanos`]).
    pub fn cost(&self, tokens: Tokens) -> Result<i64, CostOverflow> {
        cost_nanos(tokens, self.rates_for(&tokens))
    }
}

/// Token counts to price, in Switchboard's convention (`switchboard.chat.v1.Usage`, the router
/// normalises every provider to it): `prompt` counts every input token, cache reads and cache
/// writes included (OpenAI counts cached tokens inside `prompt_tokens`; Anthropic's
/// `input_tokens` excludes cache reads and writes, so the router adds them); `completion` counts
/// every output token, reasoning included (OpenAI and Gemini report reasoning as a part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Input tokens, cache reads and writes included.
    pub prompt: u32,
    /// Input tokens read from the provider's prompt cache (part of `prompt`).
    pub cached_prompt: u32,
    /// Input tokens written to the provider's prompt cache (part of `prompt`).
    pub cache_write: u32,
    /// Output tokens, reasoning included.
    pub completion: u32,
    /// Output tokens spent on reasoning (part of `completion`).
    pub reasoning: u32,
}

impl Tokens {
    /// Whether nothing was consumed.
    pub fn is_zero(&self) -> bool {
        self.prompt == 0
            && self.completion == 0
            && self.cached_prompt == 0
            && self.cache_write == 0
            && self.reasoning == 0
    }
}

/// Cost overflowed `i64` (impossible for rates within [`MAX_USD_PER_MTOK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cost overflows 64 bits")]
pub struct CostOverflow;

/// Cost in nano-USD: `uncached * input + cached * cached_input + cache_write * cache_write_rate +
/// (completion - reasoning) * output + reasoning * reasoning_rate`, with `uncached = prompt -
/// cached - cache_write`, divided by one million with round-half-up, once. The parts are clamped
/// to their whole (cache reads to `prompt`, cache writes to what is left of it, reasoning to
/// `completion`), so a malformed usage never yields a negative count nor bills a token twice.
pub fn cost_nanos(tokens: Tokens, rates: Rates) -> Result<i64, CostOverflow> {
    let cached = tokens.cached_prompt.min(tokens.prompt);
    let written = tokens.cache_write.min(tokens.prompt - cached);
    let uncached = tokens.prompt - cached - written;
    let reasoning = tokens.reasoning.min(tokens.completion);
    let output = tokens.completion - reasoning;
    let total: i128 = i128::from(uncached) * i128::from(rates.input.0)
        + i128::from(cached) * i128::from(rates.cached_input.0)
        + i128::from(written) * i128::from(rates.cache_write.0)
        + i128::from(output) * i128::from(rates.output.0)
        + i128::from(reasoning) * i128::from(rates.reasoning.0);
    // All terms are non-negative, so half-up is add-half-then-truncate.
    let rounded = (total + TOKENS_PER_QUOTE / 2) / TOKENS_PER_QUOTE;
    i64::try_from(rounded).map_err(|_| CostOverflow)
}

/// A USD-per-token JSON number converted to a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerTokenRate {
    /// The rate, nano-USD per million tokens.
    pub rate: Rate,
    /// Whether the number had digits finer than one nano-USD per million tokens (1e-15 USD per
    /// token), which were rounded half up. LiteLLM's file has a few such numbers, all float
    /// printing artefacts such as `9.499999999999999e-07` (meant: 0.95 USD per million).
    pub rounded: bool,
}

/// Parses the decimal text of a JSON number in USD per token (`7.5e-08`, `0.0000025`, `0`)
/// exactly, as digits and a decimal exponent, never through a float, into nano-USD per million
/// tokens (× 10^15).
pub fn parse_usd_per_token(text: &str) -> Result<PerTokenRate, PriceParseError> {
    if text.is_empty() {
        return Err(PriceParseError::Empty);
    }
    if text.starts_with('-') {
        return Err(PriceParseError::Negative);
    }
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (mantissa, ""),
    };
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits_only(whole)
        || !digits_only(fraction)
        || (mantissa.contains('.') && fraction.is_empty())
    {
        return Err(PriceParseError::Malformed);
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if unsigned.is_empty() || !digits_only(unsigned) {
                return Err(PriceParseError::Malformed);
            }
            // Beyond ±10^6 the value is 0 or too large anyway; saturate instead of overflowing.
            let magnitude: i64 = unsigned.parse().unwrap_or(i64::MAX).min(1_000_000);
            if e.starts_with('-') {
                -magnitude
            } else {
                magnitude
            }
        }
    };
    // value = digits × 10^shift nano-USD per million tokens.
    let all: String = [whole, fraction].concat();
    let digits = all.trim_start_matches('0');
    let shift = exponent - fraction.len() as i64 + 15;
    if digits.is_empty() {
        return Ok(PerTokenRate {
            rate: Rate(0),
            rounded: false,
        });
    }
    // The maximum, 10^15 nanos per million, has 16 digits.
    let (kept, rounded, round_up) = if shift >= 0 {
        if digits.len() as i64 + shift > 16 {
            return Err(PriceParseError::TooLarge);
        }
        let mut kept = digits.to_owned();
        kept.extend(std::iter::repeat_n('0', shift as usize));
        (kept, false, false)
    } else {
        let cut = digits.len() as i64 + shift;
        if cut > 16 {
            return Err(PriceParseError::TooLarge);
        }
        let (kept, dropped) = if cut <= 0 {
            ("", digits)
        } else {
            digits.split_at(cut as usize)
        };
        // The first dropped digit decides half-up; when cut < 0 it is a leading zero.
        let round_up = cut >= 0 && dropped.as_bytes().first().is_some_and(|d| *d >= b'5');
        let rounded = dropped.bytes().any(|d| d != b'0');
        (kept.to_owned(), rounded, round_up)
    };
    let mut nanos: i64 = if kept.is_empty() {
        0
    } else {
        kept.parse().map_err(|_| PriceParseError::Malformed)?
    };
    if round_up {
        nanos += 1;
    }
    if nanos > MAX_USD_PER_MTOK * NANOS_PER_USD {
        return Err(PriceParseError::TooLarge);
    }
    Ok(PerTokenRate {
        rate: Rate(nanos),
        rounded,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rates(input: &str, cached: &str, output: &str) -> Rates {
        Rates::flat(
            Rate::parse(input).unwrap(),
            Rate::parse(cached).unwrap(),
            Rate::parse(output).unwrap(),
        )
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
            ..Default::default()
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
                    completion: 0,
                    ..Default::default()
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
                    completion: 1,
                    ..Default::default()
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
                    completion: 1,
                    ..Default::default()
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
                    completion: 0,
                    ..Default::default()
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
            ..Default::default()
        };
        assert_eq!(cost_nanos(all_cached, r), Ok(500_000_000));
        let over = Tokens {
            prompt: 10,
            cached_prompt: 50,
            completion: 0,
            ..Default::default()
        };
        assert_eq!(
            cost_nanos(over, r),
            cost_nanos(
                Tokens {
                    prompt: 10,
                    cached_prompt: 10,
                    completion: 0,
                    ..Default::default()
                },
                r
            )
        );
    }

    #[test]
    fn maximum_rates_and_tokens_do_not_overflow() {
        let max = Rate(MAX_USD_PER_MTOK * NANOS_PER_USD);
        let r = Rates::flat(max, max, max);
        let t = Tokens {
            prompt: u32::MAX,
            cached_prompt: 0,
            completion: u32::MAX,
            ..Default::default()
        };
        assert!(cost_nanos(t, r).is_ok());
    }

    fn tokens(prompt: u32, cached: u32, write: u32, completion: u32, reasoning: u32) -> Tokens {
        Tokens {
            prompt,
            cached_prompt: cached,
            cache_write: write,
            completion,
            reasoning,
        }
    }

    fn usd(text: &str) -> Rate {
        Rate::parse(text).unwrap()
    }

    /// Token classes by their own rates, in both providers' conventions, hand-computed:
    /// Σ tokens × USD-per-million-tokens is micro-USD; × 1000 is the expected nano-USD.
    #[test]
    fn token_classes_are_priced_by_their_own_rates() {
        let mini = Pricing::flat(rates("0.15", "0.075", "0.60"));
        let o3_mini = Pricing::flat(rates("1.1", "0.55", "4.4"));
        let reasoner = Pricing::flat(Rates {
            reasoning: usd("3.5"),
            ..rates("1", "1", "10")
        });
        let sonnet = Pricing::flat(Rates {
            cache_write: usd("3.75"),
            ..rates("3", "0.30", "15")
        });
        let gemini_pro = Pricing {
            base: rates("1.25", "0.125", "10"),
            tier: Some(Tier {
                above_prompt_tokens: 200_000,
                rates: rates("2.5", "0.25", "15"),
            }),
        };
        let cases = [
            // OpenAI reports prompt_tokens 2000 with prompt_tokens_details.cached_tokens 1500:
            // 500*0.15 + 1500*0.075 + 300*0.60 = 75 + 112.5 + 180 = 367.5 micro-USD.
            (
                "openai cached",
                mini,
                tokens(2000, 1500, 0, 300, 0),
                367_500,
            ),
            // OpenAI completion_tokens 5000 with reasoning_tokens 4000 (reasoning billed as
            // output): 1000*1.1 + 5000*4.4 = 1100 + 22000 = 23100.
            (
                "openai reasoning",
                o3_mini,
                tokens(1000, 0, 0, 5000, 4000),
                23_100_000,
            ),
            // A separate reasoning rate: 100*1 + 200*10 + 800*3.5 = 100 + 2000 + 2800 = 4900.
            (
                "reasoning rate",
                reasoner,
                tokens(100, 0, 0, 1000, 800),
                4_900_000,
            ),
            // Anthropic reports input_tokens 100, cache_read_input_tokens 2000,
            // cache_creation_input_tokens 1000, output_tokens 400; the router's Usage is
            // prompt 3100 (all three), cached 2000, cache_write 1000:
            // 100*3 + 2000*0.30 + 1000*3.75 + 400*15 = 300 + 600 + 3750 + 6000 = 10650.
            (
                "anthropic cache",
                sonnet,
                tokens(3100, 2000, 1000, 400, 0),
                10_650_000,
            ),
            // Anthropic without caching: 1200*3 + 300*15 = 3600 + 4500 = 8100.
            (
                "anthropic plain",
                sonnet,
                tokens(1200, 0, 0, 300, 0),
                8_100_000,
            ),
            // Above the 200k tier the whole request takes the tier rates:
            // 200000*2.5 + 50000*0.25 + 1000*15 = 500000 + 12500 + 15000 = 527500.
            (
                "tier above",
                gemini_pro,
                tokens(250_000, 50_000, 0, 1000, 600),
                527_500_000,
            ),
            // At the threshold the base rates apply:
            // 150000*1.25 + 50000*0.125 + 1000*10 = 187500 + 6250 + 10000 = 203750.
            (
                "tier at threshold",
                gemini_pro,
                tokens(200_000, 50_000, 0, 1000, 600),
                203_750_000,
            ),
            // Parts larger than their whole are clamped: cached 8 of 10, cache writes the 2 left,
            // reasoning 7 of 5 → all 5: 8*0.30 + 2*3.75 + 5*15 = 2.4 + 7.5 + 75 = 84.9.
            ("clamped", sonnet, tokens(10, 8, 5, 5, 7), 84_900),
        ];
        for (name, pricing, tokens, expected) in cases {
            assert_eq!(pricing.cost(tokens), Ok(expected), "{name}");
        }
    }

    #[test]
    fn per_token_numbers_convert_exactly() {
        let exact = |text: &str, nanos: i64| {
            assert_eq!(
                parse_usd_per_token(text),
                Ok(PerTokenRate {
                    rate: Rate(nanos),
                    rounded: false
                }),
                "{text}"
            );
        };
        exact("1.5e-07", 150_000_000);
        exact("7.5e-08", 75_000_000);
        exact("6e-07", 600_000_000);
        exact("3.75e-06", 3_750_000_000);
        exact("1.5E-05", 15_000_000_000);
        exact("0.0000025", 2_500_000_000);
        exact("2.5e-6", 2_500_000_000);
        exact("0.00025e-2", 2_500_000_000);
        exact("0", 0);
        exact("0.0", 0);
        exact("0e5", 0);
        exact("1e-15", 1);
        exact("1", MAX_USD_PER_MTOK * NANOS_PER_USD);
        exact("1.000000000000000000", MAX_USD_PER_MTOK * NANOS_PER_USD);
        let rounded = |text: &str, nanos: i64| {
            assert_eq!(
                parse_usd_per_token(text),
                Ok(PerTokenRate {
                    rate: Rate(nanos),
                    rounded: true
                }),
                "{text}"
            );
        };
        // Float printing artefacts of LiteLLM's file, rounded half up at 1e-15 USD per token.
        rounded("9.499999999999999E-7", 950_000_000);
        rounded("5.0000000000000004e-08", 50_000_000);
        rounded("3.0001999999999996E-7", 300_020_000);
        rounded("0.0000029999900000000002", 2_999_990_000);
        rounded("5e-16", 1);
        rounded("4.9e-16", 0);
        rounded("1e-999999999999", 0);
        for (text, error) in [
            ("", PriceParseError::Empty),
            ("-1e-06", PriceParseError::Negative),
            ("1.000000000000001", PriceParseError::TooLarge),
            ("2", PriceParseError::TooLarge),
            ("1e+2", PriceParseError::TooLarge),
            ("1e99999999999", PriceParseError::TooLarge),
            ("1e", PriceParseError::Malformed),
            ("e5", PriceParseError::Malformed),
            (".5", PriceParseError::Malformed),
            ("1.e5", PriceParseError::Malformed),
            ("1e-", PriceParseError::Malformed),
            ("0x1", PriceParseError::Malformed),
            ("NaN", PriceParseError::Malformed),
            ("Infinity", PriceParseError::Malformed),
            ("\"1e-6\"", PriceParseError::Malformed),
            ("null", PriceParseError::Malformed),
        ] {
            assert_eq!(parse_usd_per_token(text), Err(error), "{text}");
        }
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
            let r = Rates::flat(Rate(input), Rate(cached_input), Rate(output));
            let cost = cost_nanos(Tokens { prompt, cached_prompt: cached, completion, ..Default::default() }, r);
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
            let with_cache = cost_nanos(Tokens { prompt, cached_prompt: cached, completion, ..Default::default() }, r).unwrap();
            let without = cost_nanos(Tokens { prompt, cached_prompt: 0, completion, ..Default::default() }, r).unwrap();
            prop_assert!(with_cache <= without);
        }

        #[test]
        fn per_token_scientific_and_plain_agree(nanos in 0i64..=MAX_USD_PER_MTOK * NANOS_PER_USD) {
            // n nano-USD per million tokens = n e-15 USD per token, written three ways.
            let expected = Ok(PerTokenRate { rate: Rate(nanos), rounded: false });
            prop_assert_eq!(parse_usd_per_token(&format!("{nanos}e-15")), expected);
            prop_assert_eq!(parse_usd_per_token(&format!("{nanos}E-15")), expected);
            let plain = format!("{:016}", nanos);
            prop_assert_eq!(parse_usd_per_token(&format!("{}.{}", &plain[..1], &plain[1..])), expected);
        }

        #[test]
        fn per_token_never_panics(text in "[-+0-9.eE]{0,30}") {
            let _ = parse_usd_per_token(&text);
        }

        #[test]
        fn all_classes_at_maximum_never_overflow(
            prompt in any::<u32>(), cached in any::<u32>(), write in any::<u32>(),
            completion in any::<u32>(), reasoning in any::<u32>(),
        ) {
            let max = Rate(MAX_USD_PER_MTOK * NANOS_PER_USD);
            let r = Rates { input: max, cached_input: max, cache_write: max, output: max, reasoning: max };
            prop_assert!(cost_nanos(tokens(prompt, cached, write, completion, reasoning), r).is_ok());
        }
    }
}

pub mod allowance;
