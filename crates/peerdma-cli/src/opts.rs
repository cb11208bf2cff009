//! Option values shared by every subcommand: one size parser (bytes, or K, M, G, T
//! suffixes in powers of 1024) and range checks, so a bad value is refused when the
//! command line is parsed, with a message that names the option (clap adds it) and the
//! allowed range.

/// Parses a size: `4096`, `64K`, `1M`, `2G`, `1T` (a `B`/`iB` tail is allowed: `1MiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("`{s}` is not a size like 4096, 64K, 1M or 2G"))
}

/// A size as the options write it: the largest unit that divides it.
pub fn show_size(b: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

/// A value parser for a size of `min..=max` bytes.
pub fn size(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v = parse_size(s)?;
        if v < min || v > max {
            return Err(format!(
                "{} is outside {}..={}",
                show_size(v),
                show_size(min),
                show_size(max)
            ));
        }
        Ok(v)
    }
}

/// A value parser for a count of `min..=max`.
pub fn count(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v: u64 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number"))?;
        if v < min || v > max {
            return Err(format!("{v} is outside {min}..={max}"));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_overflow_and_junk() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("18446744073709551615K").is_err(), "overflow");
        assert!(parse_size("").is_err());
        assert_eq!(size(4096, 1 << 30)("0"), Err("0 is outside 4K..=1G".into()));
        assert_eq!(
            size(4096, 1 << 30)("2G"),
            Err("2G is outside 4K..=1G".into())
        );
        assert_eq!(count(1, 10)("0"), Err("0 is outside 1..=10".into()));
        assert_eq!(count(1, 10)("-1"), Err("`-1` is not a whole number".into()));
        assert_eq!(show_size(1536), "1536");
    }
}
