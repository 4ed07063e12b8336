//! An outcome is made once, when the job has its verdict: the request's echoed fields, the
//! verdict, and the stamps (`started_at`, `finished_at`, `duration_ms`, `worker`). Nothing holds an
//! outcome that is not finished yet.

use std::time::{Instant, SystemTime};

use super::JobContext;
use crate::outcome::{timestamp, ErrorKind, Outcome, OutcomeError, Status};
use crate::request::{InvalidRequest, Metadata, Mode, StageRequest};
use crate::swr::Execution;

/// When the job took its delivery.
#[derive(Clone, Copy, Debug)]
pub(super) struct Started {
    /// The wall clock: `started_at`.
    pub wall: SystemTime,
    /// The monotonic clock: the job's duration, immune to a stepped wall clock.
    pub clock: Instant,
}

impl Started {
    pub fn now() -> Started {
        Started {
            wall: SystemTime::now(),
            clock: Instant::now(),
        }
    }
}

/// The request's fields that its outcome echoes (contract §4).
pub(super) struct Echo {
    /// The request's value when valid.
    pipeline_id: Option<i64>,
    /// The request's value when valid.
    stage_index: Option<i64>,
    /// The request's mode when valid.
    mode: Option<Mode>,
    /// Echo of the request's campaign.
    campaign_id: Option<String>,
    /// Echo of the request's metadata, as written.
    metadata: Option<Metadata>,
}

impl Echo {
    /// A valid request's fields (taken, not copied: the request is done with).
    pub fn of_request(request: StageRequest) -> Echo {
        Echo {
            pipeline_id: Some(request.pipeline_id),
            stage_index: Some(request.stage_index),
            mode: Some(request.mode),
            campaign_id: request.campaign_id,
            metadata: request.metadata,
        }
    }

    /// The fields an invalid request had valid.
    pub fn of_invalid(invalid: InvalidRequest) -> Echo {
        Echo {
            pipeline_id: invalid.pipeline_id,
            stage_index: invalid.stage_index,
            mode: invalid.mode,
            campaign_id: invalid.campaign_id,
            metadata: invalid.metadata,
        }
    }
}

/// How a job ended, before it is stamped: SWR's answer, or why SWR was not called.
pub(super) struct Verdict {
    /// Final state.
    status: Status,
    /// Last HTTP status SWR answered.
    http_status: Option<u16>,
    /// HTTP attempts made.
    attempts: u32,
    /// `X-Request-Id` of the last SWR answer.
    swr_request_id: Option<String>,
    /// Why it did not succeed.
    error: Option<OutcomeError>,
}

impl Verdict {
    /// SWR was not called: `kind` says why, `message` says it to a person.
    pub fn rejected(kind: ErrorKind, message: String) -> Verdict {
        Verdict {
            status: Status::Rejected,
            http_status: None,
            attempts: 0,
            swr_request_id: None,
            error: Some(OutcomeError {
                kind,
                message,
                retryable: false,
                swr_error_code: None,
            }),
        }
    }
}

impl From<Execution> for Verdict {
    fn from(execution: Execution) -> Verdict {
        Verdict {
            status: execution.status,
            http_status: execution.http_status,
            attempts: execution.attempts,
            swr_request_id: execution.swr_request_id,
            error: execution.error,
        }
    }
}

/// The finished outcome, logged as "job finished". `finished_at` is `started_at` plus the job's
/// monotonic time (a wall clock stepped mid-job cannot put it before the start), and
/// `duration_ms` is exactly the difference of the two timestamps as written.
pub(super) fn finish(
    ctx: &JobContext,
    key: String,
    echo: Echo,
    verdict: Verdict,
    started: Started,
) -> Outcome {
    let finished_at = started.wall + started.clock.elapsed();
    let outcome = Outcome {
        idempotency_key: key,
        pipeline_id: echo.pipeline_id,
        stage_index: echo.stage_index,
        mode: echo.mode,
        status: verdict.status,
        http_status: verdict.http_status,
        attempts: verdict.attempts,
        replayed: false,
        error: verdict.error,
        campaign_id: echo.campaign_id,
        metadata: echo.metadata,
        swr_request_id: verdict.swr_request_id,
        started_at: timestamp(started.wall),
        finished_at: timestamp(finished_at),
        duration_ms: epoch_ms(finished_at).saturating_sub(epoch_ms(started.wall)),
        worker: ctx.worker_id.clone(),
    };
    match &outcome.error {
        None => tracing::info!(
            status = outcome.status.as_str(),
            attempts = outcome.attempts,
            duration_ms = outcome.duration_ms,
            "job finished"
        ),
        Some(e) => {
            tracing::info!(status = outcome.status.as_str(), kind = e.kind.as_str(), attempts = outcome.attempts, http_status = ?outcome.http_status, duration_ms = outcome.duration_ms, message = %e.message, "job finished")
        }
    }
    outcome
}

/// Whole milliseconds since the Unix epoch, as [`timestamp`] writes them (0 before it).
fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
