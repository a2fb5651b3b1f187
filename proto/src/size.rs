//! Byte sizes written by people: `80GiB`, `512MiB`, `1.5GB`, `4096`.

/// Why a byte size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a byte size: write a number and a unit, such as 512MiB, 80GiB, 16GB or 4096 (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)]
pub struct SizeError {
    /// The text that was given.
    pub input: String,
}

/// Parses a byte size. Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; decimal
/// ones (`KB`, `MB`, `GB`, `TB`) powers of 1000; a bare number is bytes. Units are
/// case-insensitive; a fractional number is allowed (`1.5GiB`).
pub fn parse_bytes(input: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        input: input.to_string(),
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(err()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(err());
    }
    Ok(v.round() as u64)
}

/// Formats a byte count for people, in binary units with up to one decimal (`80 GiB`,
/// `1.5 MiB`, `512 B`).
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || (v.fract()).abs() < 0.05 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("16GB"), Ok(16_000_000_000));
        assert_eq!(parse_bytes("512mib"), Ok(512 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes(" 2 KiB "), Ok(2048));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "GiB",
            "12XB",
            "-1GiB",
            "1.2.3MB",
            "99999999999999999999TiB",
        ] {
            let e = parse_bytes(bad);
            assert!(e.is_err(), "{bad:?} should be refused");
        }
        let msg = parse_bytes("lots")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("80GiB"), "{msg}");
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_bytes(80 << 30), "80 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(512), "512 B");
    }
}
