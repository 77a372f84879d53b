//! Reading values out of a Prometheus text exposition (`GET /metrics`).

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample in `text`; comments, blank lines and lines that do not parse are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum of the samples of metric `name` whose labels include every pair in `labels` (other
/// labels may differ: `&[]` sums the whole family). `None` when no sample matches, so "not
/// exported" and "zero" stay apart.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for s in samples(text) {
        if s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)) {
            *sum.get_or_insert(0.0) += s.value;
        }
    }
    sum
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Labels up to the closing `}`; returns them and what follows.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(tail) = s.strip_prefix('}') {
            return Some((labels, tail));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP bulwark_cache_loads_total Loads.
# TYPE bulwark_cache_loads_total counter
bulwark_cache_loads_total{namespace="reports",outcome="ok"} 2
bulwark_cache_loads_total{namespace="reports",outcome="error"} 1
bulwark_cache_loads_total{namespace="pages",outcome="ok"} 5
bulwark_auction_slow_clients_total 3
bulwark_http_request_duration_seconds_bucket{route="/a",le="+Inf"} 7
odd{msg="say \"hi\", then\\go",x="1"} 1.5 1700000000000
"#;

    #[test]
    fn sums_the_series_that_carry_the_given_labels() {
        assert_eq!(
            value(
                TEXT,
                "bulwark_cache_loads_total",
                &[("namespace", "reports")]
            ),
            Some(3.0)
        );
        assert_eq!(value(TEXT, "bulwark_cache_loads_total", &[]), Some(8.0));
        assert_eq!(
            value(
                TEXT,
                "bulwark_cache_loads_total",
                &[("namespace", "reports"), ("outcome", "ok")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(TEXT, "bulwark_auction_slow_clients_total", &[]),
            Some(3.0)
        );
    }

    #[test]
    fn absent_is_none_not_zero() {
        assert_eq!(value(TEXT, "bulwark_cache_loads", &[]), None, "exact names");
        assert_eq!(
            value(TEXT, "bulwark_cache_loads_total", &[("namespace", "nope")]),
            None
        );
    }

    #[test]
    fn escapes_infinity_and_timestamps() {
        assert_eq!(
            value(
                TEXT,
                "bulwark_http_request_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(7.0)
        );
        let odd = samples(TEXT)
            .into_iter()
            .find(|s| s.name == "odd")
            .expect("odd sample");
        assert_eq!(odd.label("msg"), Some(r#"say "hi", then\go"#));
        assert_eq!((odd.label("x"), odd.value), (Some("1"), 1.5));
    }
}
