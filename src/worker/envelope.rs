//! What the job reads of a delivery besides its body's fields: a plain value the broker adapter
//! fills (`crate::amqp::delivery`) and a test builds by hand, so the job never sees a broker type.

use crate::trace::JobTrace;

/// The request as delivered: its body and the AMQP properties the worker honours (contract §3).
#[derive(Clone, Debug)]
pub struct Envelope<'a> {
    /// The message body: the request's JSON, parsed by the job.
    pub body: &'a [u8],
    /// The key when the body has none (empty counts as absent).
    pub message_id: Option<&'a str>,
    /// Copied into the outcome (empty counts as absent).
    pub correlation_id: Option<&'a str>,
    /// Where a copy of the outcome goes; the job drops a name `amqp.reply_to` refuses.
    pub reply_to: Option<&'a str>,
    /// The broker's `redelivered` flag.
    pub redelivered: bool,
    /// How many times the broker returned the message before (`x-delivery-count`, 0 when absent).
    pub delivery_count: u64,
    /// The job's place in a trace: continued from the `traceparent` and `tracestate` headers (the
    /// only headers the job reads), or new.
    pub trace: JobTrace,
}

impl<'a> Envelope<'a> {
    /// A first delivery of `body` with no properties, in a new trace.
    pub fn new(body: &'a [u8]) -> Self {
        Envelope {
            body,
            message_id: None,
            correlation_id: None,
            reply_to: None,
            redelivered: false,
            delivery_count: 0,
            trace: JobTrace::new(),
        }
    }

    /// Whether this delivery may have been handed out before: the `redelivered` flag, or a
    /// delivery count above 0 (which a quorum queue keeps even where the flag is not set).
    pub fn is_redelivery(&self) -> bool {
        self.redelivered || self.delivery_count > 0
    }
}
