//! The provisioner as a stream processor over `{ns}.organisations`.

use crate::log::events::{Event, OrganisationCreated};
use crate::stream::{apply_each, Failed, Gate, Msg, Origin, Position, Processor, StepError};

use super::clock::EventTime;
use super::provisioning::Provisioner;

/// New organisations provisioned as one unit at most (see [`Processor::apply_keys`] below).
const ONBOARDING_BATCH: usize = 100;

impl Processor for Provisioner {
    type Item = Event;
    type Target = ();

    fn name(&self) -> &'static str {
        "provisioner"
    }

    fn parse(&self, event: Event, origin: &Origin) -> Result<Event, String> {
        let id = match &event {
            Event::OrganisationCreated(e) => &e.organisation_id,
            Event::OrganisationTerminated(e) => &e.organisation_id,
            Event::OrganisationRestored(e) => &e.organisation_id,
            other => {
                return Err(format!(
                    "{} does not belong on {}",
                    other.kind().name(),
                    origin.topic
                ))
            }
        };
        // The id keys the tenant's row, its archive's name and its lock: refuse a malformed one
        // here rather than deep inside a lifecycle step.
        uuid::Uuid::parse_str(id)
            .map_err(|e| format!("organisation_id {id:?} is not a uuid: {e}"))?;
        Ok(event)
    }

    fn order_key(&self, event: &Event) -> String {
        match event {
            Event::OrganisationCreated(e) => e.organisation_id.clone(),
            Event::OrganisationTerminated(e) => e.organisation_id.clone(),
            Event::OrganisationRestored(e) => e.organisation_id.clone(),
            other => other.kind().name().to_owned(),
        }
    }

    fn group_size(&self) -> usize {
        ONBOARDING_BATCH
    }

    /// Provisioning, archives and restores write on the tenant's server: a server that does
    /// not answer parks its own tenants' lifecycle steps only.
    fn servers(&self) -> Option<&crate::store::servers::Servers> {
        Some(self.tenants.servers())
    }

    /// The lifecycle is the source of truth: its events never wait for anything.
    async fn gate(&self, msgs: &[&Msg<Event>]) -> Result<Vec<Gate<()>>, StepError> {
        Ok(msgs.iter().map(|_| Gate::Ready(())).collect())
    }

    async fn apply(&self, run: &[(&Msg<Event>, &())]) -> Result<(), Failed> {
        for (i, (m, _)) in run.iter().enumerate() {
            let done = match &m.item {
                Event::OrganisationCreated(ev) => self.provision(ev, &m.origin).await,
                // On the same topic and key as the creation, so one organisation's lifecycle is
                // applied in order (see tenancy::lifecycle).
                Event::OrganisationTerminated(ev) => {
                    let at = EventTime::new(ev.occurred_at, m.logged_at_ms());
                    self.terminate(ev, &m.origin, at).await
                }
                Event::OrganisationRestored(ev) => {
                    let at = EventTime::new(ev.occurred_at, m.logged_at_ms());
                    self.restore(ev, &m.origin, at).await
                }
                _ => unreachable!("parse admits lifecycle events only"),
            };
            done.map_err(|e| Failed::at(i, e))?;
        }
        Ok(())
    }

    /// New organisations, each the only event of its key in the batch, are provisioned as one
    /// unit ([`super::onboarding`]), 100 at a time so outcomes and progress show as they go;
    /// everything else (and whatever onboarding left) is applied key by key.
    async fn apply_keys(
        &self,
        runs: &[Vec<(&Msg<Event>, &())>],
        concurrency: usize,
    ) -> Vec<Option<Result<(), Failed>>> {
        let new: Vec<(usize, &OrganisationCreated)> = runs
            .iter()
            .enumerate()
            .filter_map(|(i, run)| match run.as_slice() {
                [(m, _)] => match &m.item {
                    Event::OrganisationCreated(ev) => Some((i, ev)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let mut outcomes: Vec<Option<Result<(), Failed>>> = runs.iter().map(|_| None).collect();
        if new.len() >= 2 {
            for chunk in new.chunks(ONBOARDING_BATCH) {
                let evs: Vec<&OrganisationCreated> = chunk.iter().map(|(_, ev)| *ev).collect();
                for ((i, _), done) in chunk.iter().zip(self.onboard(&evs, concurrency).await) {
                    if done {
                        outcomes[*i] = Some(Ok(()));
                    }
                }
            }
        }
        let rest: Vec<usize> = (0..runs.len()).filter(|i| outcomes[*i].is_none()).collect();
        let rest_runs: Vec<Vec<(&Msg<Event>, &())>> =
            rest.iter().map(|i| runs[*i].clone()).collect();
        for (i, outcome) in rest
            .into_iter()
            .zip(apply_each(self, &rest_runs, concurrency).await)
        {
            outcomes[i] = outcome;
        }
        outcomes
    }

    /// Publishes how far the lifecycle log is applied: projectors wait on it (see
    /// [`super::watermark`]).
    async fn progressed(&self, positions: &[Position]) -> Result<(), StepError> {
        self.watermark.record(positions).await
    }
}
