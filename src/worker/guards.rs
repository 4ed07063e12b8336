//! The checks between admission and SWR: the request's deadline (`not_after`), then the loop
//! guard (`guard.max_executions` per `guard.window`). Each says why the job must not run, as a
//! rejected [`Verdict`]; neither calls SWR.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::admit::Claim;
use super::stamp::{Started, Verdict};
use super::JobContext;
use crate::idempotency::StoreError;
use crate::outcome::ErrorKind;
use crate::request::StageRequest;

/// A request whose `not_after` had passed when the delivery was taken is not executed.
pub(super) fn check_deadline(request: &StageRequest, started: Started) -> Option<Verdict> {
    let now = OffsetDateTime::from(started.wall);
    let deadline = request.not_after.filter(|deadline| *deadline < now)?;
    Some(Verdict::rejected(
        ErrorKind::Expired,
        format!(
            "not executed: not_after {} had passed when the request was taken",
            deadline.format(&Rfc3339).unwrap_or_default()
        ),
    ))
}

/// Counts this execution of the request's step; a step that ran `guard.max_executions` times
/// within `guard.window` is refused (a retry loop is likely). Asked only by a job about to run,
/// as it counts executions.
pub(super) async fn loop_guard(
    ctx: &JobContext,
    claim: &Claim<'_>,
    request: &StageRequest,
) -> Result<Option<Verdict>, StoreError> {
    let guard = &ctx.config.guard;
    if guard.max_executions == 0 {
        return Ok(None);
    }
    let store = claim.gate.store();
    if store
        .count_execution(&claim.fingerprint, guard.window, guard.max_executions)
        .await?
    {
        return Ok(None);
    }
    Ok(Some(Verdict::rejected(
        ErrorKind::LoopGuard,
        format!(
            "not executed: pipeline {} stage {} ({}) already ran {} times within guard.window ({}); a retry loop is likely",
            request.pipeline_id,
            request.stage_index,
            request.mode,
            guard.max_executions,
            humantime::format_duration(guard.window)
        ),
    )))
}
