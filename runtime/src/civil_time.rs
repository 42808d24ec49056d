//! Calendar dates from Unix time, without a date library (the runtime needs only this).

/// A UTC instant split into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcParts {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
}

/// Splits seconds since the Unix epoch (negative before it) into UTC calendar fields.
pub fn utc_parts(secs: i64) -> UtcParts {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    UtcParts { year, month, day, hour: rem / 3600, minute: rem % 3600 / 60, second: rem % 60 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        let p = utc_parts(951_782_400);
        assert_eq!((p.year, p.month, p.day), (2000, 2, 29));
        let p = utc_parts(-1);
        assert_eq!((p.year, p.month, p.day, p.hour, p.minute, p.second), (1969, 12, 31, 23, 59, 59));
    }
}
