//! The NATS JetStream bus (K4), written against NATS 2.9: one filter subject per consumer,
//! server-side `max_deliver` unlimited (the kernel's wrapper, `bus::Metered`, dead-letters
//! after `max_deliver`, exactly as it does for the embedded bus).
//!
//! `bus.prefix` isolates tenants and tests on one server: stream `ORDERS` becomes
//! `<prefix>ORDERS` and subject `orders.new.1` becomes `<prefix>.orders.new.1` (a
//! trailing `.` in the prefix is dropped). Callers never see the prefix on anything returned.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind, consumer::pull, context::PublishErrorKind, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use super::{
    Acker, Bus, BusError, Consumer, ConsumerSpec, Delivery, Headers, Message, PublishAck,
    StreamSpec, validate_pattern, validate_subject,
};
use crate::config::BusConfig;

const BUS: &str = "nats";
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The bus on a NATS server with JetStream.
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
}

struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: Prefix,
    default_duplicate_window: Duration,
    request_timeout: Duration,
}

/// How `bus.prefix` maps names and subjects.
struct Prefix {
    stream: String,
    /// The leading subject token, if any.
    subject: Option<String>,
}

impl Prefix {
    fn new(raw: &str) -> Result<Self, BusError> {
        let token = raw.trim_end_matches('.');
        if token.is_empty() {
            return Ok(Self {
                stream: String::new(),
                subject: None,
            });
        }
        validate_subject(token)
            .map_err(|_| BusError::Invalid(format!("invalid bus.prefix `{raw}`")))?;
        Ok(Self {
            stream: token.replace('.', "_"),
            subject: Some(token.to_owned()),
        })
    }
    fn stream(&self, name: &str) -> String {
        format!("{}{name}", self.stream)
    }
    fn unstream(&self, name: &str) -> String {
        name.strip_prefix(&self.stream).unwrap_or(name).to_owned()
    }
    fn subject(&self, subject: &str) -> String {
        match &self.subject {
            Some(p) => format!("{p}.{subject}"),
            None => subject.to_owned(),
        }
    }
    fn unsubject(&self, subject: &str) -> String {
        match &self.subject {
            Some(p) => subject
                .strip_prefix(p.as_str())
                .and_then(|s| s.strip_prefix('.'))
                .unwrap_or(subject)
                .to_owned(),
            None => subject.to_owned(),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn other(e: impl std::fmt::Display) -> BusError {
    BusError::Other(e.to_string())
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn to_header_map(headers: &Headers) -> Result<HeaderMap, BusError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let n: HeaderName = name
            .parse()
            .map_err(|_| BusError::Invalid(format!("invalid header name `{name}`")))?;
        let v: HeaderValue = value
            .parse()
            .map_err(|_| BusError::Invalid(format!("invalid value of header `{name}`")))?;
        map.insert(n, v);
    }
    Ok(map)
}

/// Headers as callers see them: first value of each, the message id split out.
fn from_header_map(map: Option<&HeaderMap>) -> (Headers, Option<String>) {
    let mut headers = Headers::new();
    let mut id = None;
    for (name, values) in map.into_iter().flat_map(HeaderMap::iter) {
        let Some(value) = values.first() else {
            continue;
        };
        if name.as_ref() as &str == MSG_ID_HEADER {
            id = Some(value.as_str().to_owned());
        } else {
            headers.insert(name.to_string(), value.as_str().to_owned());
        }
    }
    (headers, id)
}

impl NatsBus {
    /// Connect to `cfg.url`. Returns at once even when the server is down: the client keeps
    /// retrying in the background and [`Bus::health`] fails until it is connected.
    pub async fn connect(cfg: &BusConfig) -> Result<Self, BusError> {
        let url = cfg
            .url
            .as_ref()
            .ok_or_else(|| BusError::Invalid("bus.url is not set".into()))?;
        let prefix = Prefix::new(&cfg.prefix)?;
        let client = async_nats::ConnectOptions::new()
            .name("bulwark")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(cfg.request_timeout)
            .request_timeout(Some(cfg.request_timeout))
            .connect(url.expose())
            .await
            .map_err(|e| BusError::Unavailable(format!("{} ({})", e, url.redacted())))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.request_timeout)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                js,
                prefix,
                default_duplicate_window: cfg.duplicate_window,
                request_timeout: cfg.request_timeout,
            }),
        })
    }
}

impl Shared {
    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        validate_subject(subject)?;
        crate::telemetry::inject_context(&mut headers);
        let mut map = to_header_map(&headers)?;
        if let Some(id) = message_id {
            let v: HeaderValue = id
                .parse()
                .map_err(|_| BusError::Invalid("invalid message id".into()))?;
            if id.is_empty() {
                return Err(BusError::Invalid("empty message id".into()));
            }
            map.insert(async_nats::header::NATS_MESSAGE_ID, v);
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(map);
        // One bound for the whole publish: the wait for an in-flight slot (JetStream's
        // back-pressure, which the client's request timeout does not cover) and the ack. A
        // caller that promises "stored within request_timeout or refused" relies on it.
        let sent = async {
            self.js
                .send_publish(self.prefix.subject(subject), publish)
                .await
                .map_err(|e| publish_error(subject, &e))?
                .await
                .map_err(|e| publish_error(subject, &e))
        };
        let ack = tokio::time::timeout(self.request_timeout, sent)
            .await
            .map_err(|_| {
                BusError::Timeout(format!(
                    "publish to `{subject}`: not acknowledged within {:?}",
                    self.request_timeout
                ))
            })??;
        Ok(PublishAck {
            stream: self.prefix.unstream(&ack.stream),
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

fn publish_error(subject: &str, e: &jetstream::context::PublishError) -> BusError {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            BusError::Invalid(format!("no stream captures subject `{subject}`"))
        }
        PublishErrorKind::TimedOut => BusError::Timeout(format!("publish to `{subject}`: {e}")),
        PublishErrorKind::BrokenPipe => {
            BusError::Unavailable(format!("publish to `{subject}`: {e}"))
        }
        PublishErrorKind::MaxPayloadExceeded => {
            BusError::Invalid(format!("publish to `{subject}`: {e}"))
        }
        _ => BusError::Other(format!("publish to `{subject}`: {e}")),
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        BUS
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        spec.validate()?;
        let s = &self.shared;
        let name = s.prefix.stream(&spec.name);
        let subjects: Vec<String> = spec.subjects.iter().map(|x| s.prefix.subject(x)).collect();
        let window = if spec.duplicate_window.is_zero() {
            s.default_duplicate_window
        } else {
            spec.duplicate_window
        };
        let max_age = spec.max_age.unwrap_or(Duration::ZERO);
        let apply = |config: &mut stream::Config| {
            config.subjects = subjects.clone();
            config.duplicate_window = window;
            config.max_age = max_age;
        };
        // Two attempts: a concurrent creator may win between our lookup and create.
        for _ in 0..2 {
            match s.js.get_stream(&name).await {
                Ok(existing) => {
                    let current = &existing.cached_info().config;
                    let mut wanted = current.clone();
                    apply(&mut wanted);
                    let mut a = current.subjects.clone();
                    a.sort();
                    let mut b = wanted.subjects.clone();
                    b.sort();
                    if a == b && current.duplicate_window == window && current.max_age == max_age {
                        return Ok(());
                    }
                    s.js.update_stream(&wanted)
                        .await
                        .map_err(|e| other(format!("update stream `{name}`: {e}")))?;
                    return Ok(());
                }
                Err(e) if is_stream_not_found(&e) => {
                    let mut config = stream::Config {
                        name: name.clone(),
                        storage: stream::StorageType::File,
                        ..Default::default()
                    };
                    apply(&mut config);
                    match s.js.create_stream(config).await {
                        Ok(_) => return Ok(()),
                        Err(e) => {
                            tracing::debug!(message = "Stream create failed; looking again.", error = %e)
                        }
                    }
                }
                Err(e) => return Err(unavailable(format!("look up stream `{name}`: {e}"))),
            }
        }
        Err(BusError::Other(format!("cannot declare stream `{name}`")))
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        self.shared
            .publish(subject, message_id, headers, payload)
            .await
    }

    async fn consumer(&self, spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BusError> {
        spec.validate()?;
        let s = &self.shared;
        let stream_name = s.prefix.stream(&spec.stream);
        let stream = s.js.get_stream(&stream_name).await.map_err(|e| {
            if is_stream_not_found(&e) {
                BusError::Invalid(format!("unknown stream `{}`", spec.stream))
            } else {
                unavailable(format!("look up stream `{stream_name}`: {e}"))
            }
        })?;
        let ack_wait = spec.ack_wait_or_default();
        let config = pull::Config {
            durable_name: Some(spec.durable.clone()),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            // Unlimited on the server: the wrapper dead-letters after `spec.max_deliver`.
            max_deliver: -1,
            filter_subject: spec
                .filter_subject
                .as_deref()
                .map(|f| s.prefix.subject(f))
                .unwrap_or_default(),
            ..Default::default()
        };
        // Create-or-update: an existing durable keeps its position.
        let consumer = stream.create_consumer(config).await.map_err(|e| {
            other(format!(
                "create consumer `{}` on `{stream_name}`: {e}",
                spec.durable
            ))
        })?;
        Ok(Box::new(NatsConsumer {
            shared: s.clone(),
            consumer,
        }))
    }

    async fn broadcast(
        &self,
        subject: &str,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        validate_subject(subject)?;
        crate::telemetry::inject_context(&mut headers);
        let map = to_header_map(&headers)?;
        self.shared
            .client
            .publish_with_headers(self.shared.prefix.subject(subject), map, payload)
            .await
            .map_err(unavailable)
    }

    async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError> {
        validate_pattern(subject)?;
        let shared = self.shared.clone();
        let sub = shared
            .client
            .subscribe(shared.prefix.subject(subject))
            .await
            .map_err(unavailable)?;
        Ok(sub
            .map(move |m| {
                let (headers, _) = from_header_map(m.headers.as_ref());
                Message {
                    subject: shared.prefix.unsubject(&m.subject),
                    headers,
                    payload: m.payload,
                }
            })
            .boxed())
    }

    async fn health(&self) -> Result<(), BusError> {
        let s = &self.shared;
        let state = s.client.connection_state();
        if state != State::Connected {
            return Err(BusError::Unavailable(format!(
                "NATS connection is {state:?}"
            )));
        }
        match tokio::time::timeout(s.request_timeout, s.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(unavailable(format!("NATS flush: {e}"))),
            Err(_) => Err(BusError::Timeout("NATS flush".into())),
        }
    }
}

struct NatsConsumer {
    shared: Arc<Shared>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

impl NatsConsumer {
    /// What the server has for us right now, without waiting.
    async fn pull_now(&self, max: usize) -> Result<Vec<jetstream::Message>, BusError> {
        let batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(unavailable)?;
        collect(batch).await
    }

    /// Waits up to `wait` for one message. A batch of one ends on the first message, so no
    /// pull request outlives this call to swallow a later message.
    async fn pull_one(&self, wait: Duration) -> Result<Vec<jetstream::Message>, BusError> {
        let batch = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(unavailable)?;
        collect(batch).await
    }

    async fn deliveries(&self, msgs: Vec<jetstream::Message>) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (seq, delivered) = match msg.info() {
                Ok(info) => (info.stream_sequence, info.delivered),
                Err(e) => {
                    tracing::warn!(message = "JetStream message without ack metadata; skipped.", error = %e);
                    continue;
                }
            };
            let subject = self.shared.prefix.unsubject(&msg.subject);
            let (headers, message_id) = from_header_map(msg.headers.as_ref());
            let payload = msg.payload.clone();
            out.push(Delivery::new(
                subject,
                headers,
                payload,
                message_id,
                seq,
                u32::try_from(delivered).unwrap_or(u32::MAX),
                Box::new(NatsAcker { msg }),
            ));
        }
        out
    }
}

async fn collect(mut batch: pull::Batch) -> Result<Vec<jetstream::Message>, BusError> {
    let mut out = Vec::new();
    while let Some(item) = batch.next().await {
        match item {
            Ok(m) => out.push(m),
            // Status replies such as 409 end a batch; keep what arrived before.
            Err(e) if !out.is_empty() => {
                tracing::debug!(message = "Pull batch ended with a status.", error = %e);
                break;
            }
            Err(e) => return Err(other(format!("pull: {e}"))),
        }
    }
    Ok(out)
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn pending(&self) -> Result<u64, BusError> {
        let info = self.consumer.get_info().await.map_err(unavailable)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    async fn unacked(&self) -> Result<u64, BusError> {
        let info = self.consumer.get_info().await.map_err(unavailable)?;
        Ok(info.num_ack_pending as u64)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut msgs = self.pull_now(max).await?;
            if msgs.is_empty() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left >= Duration::from_millis(1) {
                    msgs = self.pull_one(left).await?;
                    if !msgs.is_empty() && max > 1 {
                        msgs.extend(self.pull_now(max - 1).await?);
                    }
                }
            }
            let got = self.deliveries(msgs).await;
            // Only messages without ack metadata arrived: look again while time is left.
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
        }
    }
}

struct NatsAcker {
    msg: jetstream::Message,
}

fn ack_error(e: &async_nats::Error) -> BusError {
    let text = e.to_string();
    if text.contains("timed out") {
        BusError::Timeout(format!("ack: {text}"))
    } else {
        BusError::Unavailable(format!("ack: {text}"))
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // Double ack: returns once the server has recorded it.
        self.msg.double_ack().await.map_err(|e| ack_error(&e))
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        let delay = (!delay.is_zero()).then_some(delay);
        // Double ack: when it returns the server has queued the message for redelivery, so a
        // consumer handing deliveries back can then tell the next owner they are back.
        self.msg
            .double_ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| ack_error(&e))
    }
    async fn in_progress(&self) -> Result<(), BusError> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| ack_error(&e))
    }
    async fn term(&self) -> Result<(), BusError> {
        self.msg
            .double_ack_with(AckKind::Term)
            .await
            .map_err(|e| ack_error(&e))
    }
}
