//! The JSON log line: one object per event, every key once.
//!
//! tracing-subscriber's own JSON formatter writes an event's fields as they come, so an event
//! that has a formatted message and also a field called `message` (opentelemetry's internal
//! logs do) becomes an object with two `message` keys, which most log shippers refuse or
//! mangle. This formatter keeps the first non-empty value under the name and any later one
//! under `<name>.<n>`.

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `{"timestamp", "level", "message", fields..., "target", "spans"}` with unique keys.
pub struct JsonLines;

/// Keys in insertion order, each once.
#[derive(Default)]
pub(crate) struct UniqueKeys(Vec<(String, Value)>);

impl UniqueKeys {
    pub(crate) fn insert(&mut self, key: &str, value: Value) {
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| k == key) {
            // An empty message (an event whose only text is a `message` field) gives way.
            if slot.1.as_str() == Some("") {
                slot.1 = value;
                return;
            }
            let mut n = 2;
            let renamed = loop {
                let candidate = format!("{key}.{n}");
                if !self.0.iter().any(|(k, _)| *k == candidate) {
                    break candidate;
                }
                n += 1;
            };
            self.0.push((renamed, value));
        } else {
            self.0.push((key.to_owned(), value));
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(k.clone()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
        out
    }
}

impl Visit for UniqueKeys {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field.name(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field.name(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = UniqueKeys::default();
        line.insert(
            "timestamp",
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level", Value::from(meta.level().as_str()));
        event.record(&mut line);
        line.insert("target", Value::from(meta.target()));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut fields = serde_json::Map::new();
                    fields.insert("name".into(), Value::from(span.name()));
                    // Span fields were formatted by the layer's JSON field formatter.
                    if let Some(formatted) = span.extensions().get::<FormattedFields<N>>()
                        && let Ok(Value::Object(map)) =
                            serde_json::from_str::<Value>(formatted.as_str())
                    {
                        for (k, v) in map {
                            fields.entry(k).or_insert(v);
                        }
                    }
                    Value::Object(fields)
                })
                .collect();
            if !spans.is_empty() {
                line.insert("spans", Value::Array(spans));
            }
        }
        writeln!(writer, "{}", line.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_kept_once_and_the_second_value_renamed() {
        let mut line = UniqueKeys::default();
        line.insert("message", Value::from(""));
        line.insert("name", Value::from("X"));
        line.insert("message", Value::from("real text"));
        line.insert("name", Value::from("Y"));
        line.insert("name", Value::from("Z"));
        assert_eq!(
            line.render(),
            r#"{"message":"real text","name":"X","name.2":"Y","name.3":"Z"}"#
        );
        let parsed: serde_json::Map<String, Value> =
            serde_json::from_str(&line.render()).expect("valid JSON");
        assert_eq!(parsed.len(), 4);
    }
}
