//! What a machine does, from its provider's view and its worker's registry
//! entry (pure): a machine's name is its worker's id.
//!
//! - **Exited**: its provider says so, or it runs without an entry for
//!   `vanished_after_ms` (never registered, or its entry expired);
//! - **Draining**: the autoscaler is draining it, or its entry says it
//!   drains (so a new leader carries on its predecessor's drains);
//! - **Starting**: no entry yet;
//! - **Busy**: its entry has a task running;
//! - **Idle**: its entry has none, since `idle_since`.
//!
//! A draining machine is released once its entry says it drained
//! ([`drain_step`]).

use crate::plan::{Activity, MachineView};
use crate::provider::{Machine, MachineState};
use trainyard_core::registry::Entry;

/// One machine's activity. `last_entry_ms` is when its entry was last
/// seen (0: never); `draining` whether this replica drains it.
pub fn activity_of(
    machine: &Machine,
    entry: Option<&Entry>,
    last_entry_ms: i64,
    draining: bool,
    vanished_after_ms: i64,
    now_ms: i64,
) -> (Activity, i64) {
    if machine.state == MachineState::Exited {
        return (Activity::Exited, now_ms);
    }
    if draining || entry.is_some_and(|e| e.draining) {
        return (Activity::Draining, now_ms);
    }
    let Some(entry) = entry else {
        let silent_since = last_entry_ms.max(machine.created_at_ms);
        return if now_ms - silent_since >= vanished_after_ms {
            (Activity::Exited, now_ms)
        } else {
            (Activity::Starting, machine.created_at_ms)
        };
    };
    if entry.busy_slots > 0 {
        (Activity::Busy, entry.updated_at)
    } else {
        let since = if entry.idle_since > 0 {
            entry.idle_since
        } else {
            entry.started_at
        };
        (Activity::Idle, since)
    }
}

/// What a pass does about a machine being drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainStep {
    /// Ask its service (again) to drain.
    Ask,
    /// Drained (its entry says `draining` with no task) or gone: release it.
    Release,
    /// Not drained within the drain timeout: release it anyway.
    ReleaseLate,
}

/// A draining machine's next step, from its fresh registry entry
/// (`Ok(None)`: gone; `Err(())`: unreadable now), since when it drains and
/// the drain timeout (ms).
pub fn drain_step(
    entry: Result<Option<&Entry>, ()>,
    since_ms: i64,
    now_ms: i64,
    timeout_ms: i64,
) -> DrainStep {
    let drained = match entry {
        Ok(None) => true,
        Ok(Some(entry)) => entry.draining && entry.busy_slots == 0,
        Err(()) => false,
    };
    if drained {
        DrainStep::Release
    } else if now_ms.saturating_sub(since_ms) >= timeout_ms {
        DrainStep::ReleaseLate
    } else {
        DrainStep::Ask
    }
}

/// The planner's view of one machine.
pub fn view(machine: &Machine, activity: Activity, since_ms: i64) -> MachineView {
    MachineView {
        name: machine.name.clone(),
        activity,
        since_ms,
        dollars_per_hour: machine.dollars_per_hour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(state: MachineState) -> Machine {
        Machine {
            id: "1".into(),
            name: "ty-train-default-0".into(),
            pool: "train.default".into(),
            gpu_type: String::new(),
            dollars_per_hour: 0.0,
            interruptible: false,
            state,
            created_at_ms: 1_000,
            host: String::new(),
        }
    }

    fn entry(busy: usize, idle_since: i64) -> Entry {
        Entry {
            worker_id: "ty-train-default-0".into(),
            stage: "train".into(),
            pool: "default".into(),
            slots: 1,
            busy_slots: busy,
            idle_since,
            draining: false,
            started_at: 1_500,
            updated_at: 4_000,
            jobs: vec![],
        }
    }

    #[test]
    fn activity_follows_the_provider_and_the_entry() {
        let running = machine(MachineState::Running);
        let rows = [
            ("no entry yet", None, 0, false, 5_000, Activity::Starting),
            (
                "no entry for too long",
                None,
                0,
                false,
                20_000,
                Activity::Exited,
            ),
            (
                "entry lost",
                None,
                15_000,
                false,
                20_000,
                Activity::Starting,
            ),
            (
                "entry lost long ago",
                None,
                5_000,
                false,
                20_000,
                Activity::Exited,
            ),
            ("busy", Some(entry(1, 0)), 0, false, 5_000, Activity::Busy),
            (
                "idle",
                Some(entry(0, 3_000)),
                0,
                false,
                5_000,
                Activity::Idle,
            ),
            (
                "draining",
                Some(entry(1, 0)),
                0,
                true,
                5_000,
                Activity::Draining,
            ),
        ];
        for (row, e, seen, draining, now, want) in rows {
            let (got, _) = activity_of(&running, e.as_ref(), seen, draining, 10_000, now);
            assert_eq!(got, want, "{row}");
        }
        let (_, since) = activity_of(&running, Some(&entry(0, 3_000)), 0, false, 10_000, 5_000);
        assert_eq!(since, 3_000);
        // Draining by its entry, whatever this replica remembers.
        let asked = Entry {
            draining: true,
            ..entry(1, 0)
        };
        let (got, _) = activity_of(&running, Some(&asked), 0, false, 10_000, 5_000);
        assert_eq!(got, Activity::Draining);
        let exited = machine(MachineState::Exited);
        let (got, _) = activity_of(&exited, Some(&entry(1, 0)), 0, false, 10_000, 5_000);
        assert_eq!(got, Activity::Exited);
    }

    #[test]
    fn a_drained_or_gone_machine_is_released_and_a_late_one_anyway() {
        let draining = |busy| Entry {
            draining: true,
            ..entry(busy, 0)
        };
        let (since, timeout) = (1_000, 60_000);
        let rows = [
            (
                "asked, not heard yet",
                Ok(Some(entry(1, 0))),
                2_000,
                DrainStep::Ask,
            ),
            (
                "handing its task back",
                Ok(Some(draining(1))),
                2_000,
                DrainStep::Ask,
            ),
            ("drained", Ok(Some(draining(0))), 2_000, DrainStep::Release),
            (
                "idle, not draining",
                Ok(Some(entry(0, 1_500))),
                2_000,
                DrainStep::Ask,
            ),
            ("entry gone", Ok(None), 2_000, DrainStep::Release),
            ("entry unreadable", Err(()), 2_000, DrainStep::Ask),
            (
                "past the timeout",
                Ok(Some(draining(1))),
                61_000,
                DrainStep::ReleaseLate,
            ),
            (
                "unreadable past it",
                Err(()),
                61_000,
                DrainStep::ReleaseLate,
            ),
            (
                "drained past it",
                Ok(Some(draining(0))),
                61_000,
                DrainStep::Release,
            ),
        ];
        for (row, e, now, want) in rows {
            let got = drain_step(
                e.as_ref().map(Option::as_ref).map_err(|_| ()),
                since,
                now,
                timeout,
            );
            assert_eq!(got, want, "{row}");
        }
    }
}
