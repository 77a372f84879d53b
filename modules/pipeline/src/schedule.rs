//! When a DAG runs: cron, fixed interval, dataset-triggered or manual only, and the data
//! intervals (logical dates) those schedules produce.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Serialize, Serializer};

/// How a DAG is scheduled.
// The cron variant is large, but there is one Schedule per DAG and callers match on the plain
// `croner::Cron` field, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Manual (and backfill) runs only.
    None,
    /// A 5-field cron expression (or an `@daily`-style alias), evaluated in the DAG's timezone.
    Cron { expr: String, cron: Cron },
    /// Every `Duration` from `start_date`.
    Interval(Duration),
    /// Runs when any of these datasets receives an event.
    Dataset(Vec<String>),
}

/// One run's data interval; the logical date is `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct DataInterval {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Schedule {
    /// Parse the `schedule` text of a DAG file.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("schedule is empty".into());
        }
        if text.eq_ignore_ascii_case("none") {
            return Ok(Schedule::None);
        }
        if let Some(rest) = text.strip_prefix("dataset:") {
            let names: Vec<String> = rest.split(',').map(|s| s.trim().to_string()).collect();
            if names.iter().any(String::is_empty) {
                return Err(format!("bad dataset schedule `{text}`: empty dataset name"));
            }
            return Ok(Schedule::Dataset(names));
        }
        if let Some(rest) = text.strip_prefix("every ") {
            let every = humantime::parse_duration(rest.trim())
                .map_err(|e| format!("bad interval `{}`: {e}", rest.trim()))?;
            // A zero step would make interval arithmetic loop forever.
            if every.is_zero() {
                return Err("interval must be greater than zero".into());
            }
            return Ok(Schedule::Interval(every));
        }
        // Exactly 5 fields (or an alias): seconds/years would silently change the meaning of
        // intervals, so they are not accepted.
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(text)
            .map_err(|e| format!("bad cron expression `{text}`: {e}"))?;
        Ok(Schedule::Cron {
            expr: text.to_string(),
            cron,
        })
    }

    /// The text form, which [`Schedule::parse`] reads back.
    pub fn describe(&self) -> String {
        match self {
            Schedule::None => "none".into(),
            Schedule::Cron { expr, .. } => expr.clone(),
            Schedule::Interval(d) => format!("every {}", humantime::format_duration(*d)),
            Schedule::Dataset(names) => format!("dataset:{}", names.join(",")),
        }
    }

    /// The first interval whose start is at or after `after` (and never before `start_date`).
    pub fn next_interval(
        &self,
        start_date: DateTime<Utc>,
        tz: Tz,
        after: Option<DateTime<Utc>>,
    ) -> Option<DataInterval> {
        let lower = after.map_or(start_date, |a| a.max(start_date));
        match self {
            Schedule::None | Schedule::Dataset(_) => None,
            Schedule::Cron { cron, .. } => {
                // "At or after `lower`" is searched as "after `lower` - 1s": an inclusive search
                // would not count a time croner snapped past a DST gap (03:00 for a 02:00 job)
                // as a fire time, and would skip that day.
                let from = ceil_second(lower)?.checked_sub_signed(chrono::TimeDelta::seconds(1))?;
                let start = cron_next(cron, tz, from)?;
                let end = cron_next(cron, tz, start)?;
                Some(DataInterval { start, end })
            }
            Schedule::Interval(every) => {
                let step = nanos_of(*every);
                let diff = ts_nanos(lower) - ts_nanos(start_date);
                // Ceiling division: the first multiple of `every` not before `lower`.
                let k = (diff + step - 1).div_euclid(step).max(0);
                let start = from_nanos(ts_nanos(start_date).checked_add(k.checked_mul(step)?)?)?;
                let end = from_nanos(ts_nanos(start).checked_add(step)?)?;
                Some(DataInterval { start, end })
            }
        }
    }

    /// The interval a run with this logical date covers. A logical date that is not a schedule
    /// point (a manual trigger at an arbitrary time) covers up to the next schedule point;
    /// None/Dataset schedules give the empty interval `[logical_date, logical_date)`.
    pub fn interval_at(
        &self,
        start_date: DateTime<Utc>,
        tz: Tz,
        logical_date: DateTime<Utc>,
    ) -> DataInterval {
        let empty = DataInterval {
            start: logical_date,
            end: logical_date,
        };
        match self {
            Schedule::None | Schedule::Dataset(_) => empty,
            Schedule::Cron { cron, .. } => {
                let end = cron_next(cron, tz, logical_date);
                end.map_or(empty, |end| DataInterval {
                    start: logical_date,
                    end,
                })
            }
            // Any logical date covers one step; alignment to `start_date` only matters for
            // scheduled runs, which come from `next_interval`.
            Schedule::Interval(every) => {
                let _ = start_date;
                let end = from_nanos(ts_nanos(logical_date).saturating_add(nanos_of(*every)));
                end.map_or(empty, |end| DataInterval {
                    start: logical_date,
                    end,
                })
            }
        }
    }

    /// Every interval whose start lies in `[from, to]`, at most `limit + 1` of them so that a
    /// caller can tell "over the limit" from "exactly at the limit".
    pub fn intervals_between(
        &self,
        start_date: DateTime<Utc>,
        tz: Tz,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DataInterval> {
        let mut out = Vec::new();
        let mut cursor = Some(from);
        while out.len() <= limit {
            let Some(iv) = self.next_interval(start_date, tz, cursor) else {
                break;
            };
            if iv.start > to {
                break;
            }
            // Intervals are never empty for Cron/Interval, so `end` strictly advances the cursor.
            if iv.end <= iv.start {
                out.push(iv);
                break;
            }
            cursor = Some(iv.end);
            out.push(iv);
        }
        out
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

/// The next cron fire time strictly after `from`, evaluated on the wall clock of `tz`.
fn cron_next(cron: &Cron, tz: Tz, from: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&from.with_timezone(&tz), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// croner works in whole seconds; round up so an "at or after" search never returns a time
/// before `t`.
fn ceil_second(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if t.timestamp_subsec_nanos() == 0 {
        Some(t)
    } else {
        Utc.timestamp_opt(t.timestamp().checked_add(1)?, 0).single()
    }
}

fn nanos_of(d: Duration) -> i128 {
    // Parsing rejects zero; keep the step positive anyway so division is always defined.
    (d.as_nanos() as i128).max(1)
}

fn ts_nanos(t: DateTime<Utc>) -> i128 {
    i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos())
}

fn from_nanos(n: i128) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(n.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(n.rem_euclid(1_000_000_000)).ok()?;
    Utc.timestamp_opt(secs, sub).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test date")
            .with_timezone(&Utc)
    }

    #[test]
    fn parse_forms() {
        assert!(matches!(
            Schedule::parse("0 2 * * *"),
            Ok(Schedule::Cron { .. })
        ));
        assert!(matches!(
            Schedule::parse("@daily"),
            Ok(Schedule::Cron { .. })
        ));
        assert!(matches!(
            Schedule::parse("@hourly"),
            Ok(Schedule::Cron { .. })
        ));
        assert!(matches!(
            Schedule::parse("@weekly"),
            Ok(Schedule::Cron { .. })
        ));
        assert!(matches!(
            Schedule::parse("@monthly"),
            Ok(Schedule::Cron { .. })
        ));
        assert_eq!(
            Schedule::parse("every 1h"),
            Ok(Schedule::Interval(Duration::from_secs(3600)))
        );
        assert_eq!(
            Schedule::parse("dataset:a, b"),
            Ok(Schedule::Dataset(vec!["a".into(), "b".into()]))
        );
        assert_eq!(Schedule::parse("none"), Ok(Schedule::None));
        for bad in [
            "",
            "0 2 * *",
            "0 0 2 * * *",
            "61 * * * *",
            "every 0s",
            "every x",
            "dataset:a,,b",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn describe_round_trips() {
        for text in ["0 2 * * *", "every 1h 30m", "dataset:a,b", "none"] {
            let s = Schedule::parse(text).expect("parses");
            assert_eq!(Schedule::parse(&s.describe()), Ok(s.clone()));
        }
    }

    #[test]
    fn daily_cron_in_seoul_is_1500_utc() {
        let s = Schedule::parse("@daily").expect("parses");
        let start = utc("2026-11-01T00:00:00+09:00");
        let iv = s
            .next_interval(start, chrono_tz::Asia::Seoul, None)
            .expect("interval");
        assert_eq!(iv.start, utc("2026-10-31T15:00:00Z"));
        assert_eq!(iv.end, utc("2026-11-01T15:00:00Z"));
    }

    #[test]
    fn spring_forward_2am_cron_new_york() {
        // 2026-03-08 02:00 does not exist in New York; croner runs the job at 03:00 EDT.
        let s = Schedule::parse("0 2 * * *").expect("parses");
        let tz = chrono_tz::America::New_York;
        let start = utc("2026-03-01T00:00:00Z");
        let a = s
            .next_interval(start, tz, Some(utc("2026-03-07T07:00:00Z")))
            .expect("interval");
        assert_eq!(a.start, utc("2026-03-07T07:00:00Z")); // 02:00 EST
        assert_eq!(a.end, utc("2026-03-08T07:00:00Z")); // 03:00 EDT (snapped past the gap)
        let b = s.next_interval(start, tz, Some(a.end)).expect("interval");
        assert_eq!(b.start, a.end);
        assert_eq!(b.end, utc("2026-03-09T06:00:00Z")); // 02:00 EDT
        // The DST day's interval is 23 hours long.
        assert_eq!((a.end - a.start).num_hours(), 24);
        assert_eq!((b.end - b.start).num_hours(), 23);
    }

    #[test]
    fn every_hour_from_start_date() {
        let s = Schedule::parse("every 1h").expect("parses");
        let start = utc("2026-11-01T00:30:00Z");
        let first = s.next_interval(start, Tz::UTC, None).expect("interval");
        assert_eq!(first.start, start);
        assert_eq!(first.end, utc("2026-11-01T01:30:00Z"));
        let later = s
            .next_interval(start, Tz::UTC, Some(utc("2026-11-01T05:00:00Z")))
            .expect("interval");
        assert_eq!(later.start, utc("2026-11-01T05:30:00Z"));
        // Before start_date: still the first interval.
        let early = s
            .next_interval(start, Tz::UTC, Some(utc("2020-01-01T00:00:00Z")))
            .expect("interval");
        assert_eq!(early, first);
    }

    #[test]
    fn next_interval_after_is_inclusive() {
        // Catch-up resumes at the end of the last run: that point itself is the next start.
        let s = Schedule::parse("@daily").expect("parses");
        let start = utc("2026-11-01T00:00:00Z");
        let after = utc("2026-11-05T00:00:00Z");
        let iv = s
            .next_interval(start, Tz::UTC, Some(after))
            .expect("interval");
        assert_eq!(iv.start, after);
        // A time inside an interval moves to the next schedule point.
        let iv = s
            .next_interval(start, Tz::UTC, Some(utc("2026-11-05T00:00:00.5Z")))
            .expect("interval");
        assert_eq!(iv.start, utc("2026-11-06T00:00:00Z"));
    }

    #[test]
    fn intervals_between_limit() {
        let s = Schedule::parse("@daily").expect("parses");
        let start = utc("2026-11-01T00:00:00Z");
        let all = s.intervals_between(start, Tz::UTC, start, utc("2026-11-10T00:00:00Z"), 100);
        assert_eq!(all.len(), 10); // both ends inclusive
        assert_eq!(all[9].start, utc("2026-11-10T00:00:00Z"));
        let capped = s.intervals_between(start, Tz::UTC, start, utc("2026-11-10T00:00:00Z"), 3);
        assert_eq!(capped.len(), 4);
        let exact = s.intervals_between(start, Tz::UTC, start, utc("2026-11-03T00:00:00Z"), 3);
        assert_eq!(exact.len(), 3);
        assert!(
            Schedule::None
                .intervals_between(start, Tz::UTC, start, utc("2026-11-03T00:00:00Z"), 3)
                .is_empty()
        );
    }

    #[test]
    fn interval_at_and_manual() {
        let s = Schedule::parse("@daily").expect("parses");
        let start = utc("2026-11-01T00:00:00Z");
        let d = utc("2026-11-30T00:00:00Z");
        assert_eq!(
            s.interval_at(start, Tz::UTC, d),
            DataInterval {
                start: d,
                end: utc("2026-12-01T00:00:00Z")
            }
        );
        let odd = utc("2026-11-30T10:00:00Z");
        assert_eq!(
            s.interval_at(start, Tz::UTC, odd).end,
            utc("2026-12-01T00:00:00Z")
        );
        let m = Schedule::None.interval_at(start, Tz::UTC, odd);
        assert_eq!((m.start, m.end), (odd, odd));
        assert_eq!(Schedule::None.next_interval(start, Tz::UTC, None), None);
    }
}
