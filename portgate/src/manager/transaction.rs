//! The one path every change takes: the allocator (memory) first, then the kernel and its
//! userspace mirror, then the store.
//!
//! Under the manager's lock, an operation changes the allocator and hands [`PortManager::apply`]
//! the ports it touched with their allocations from before. Each port is then written to
//! the kernel; a port the kernel refuses is put back as it was, in memory and kernel. The
//! ports that changed go to the store in one submission, and the lock is let go. The
//! operation then waits in [`PortManager::settle`] until the store says the change is
//! durable; if the store refuses it, every port still as the change left it is put back and
//! no further change is taken until a restart (which makes the kernel equal to the store).

use super::{ErrorSource, PortError, PortManager, Result, STORE_ADVICE, State, Ticked, Transition};
use crate::text::Chain;
use crate::{
    model::{Allocation, PortId},
    store::{Change, Commit},
};

/// A port's allocation before a change (`None`: it had none).
pub(super) type Before = (PortId, Option<Allocation>);

/// A change in the kernel and submitted to the store, not yet durable.
pub(super) struct Pending {
    commit: Option<Commit>,
    /// Each changed port: its allocation before and after.
    changed: Vec<(PortId, Option<Allocation>, Option<Allocation>)>,
}

impl State {
    /// Makes the kernel and the userspace mirror agree with `record`, a port's allocation
    /// (`None`: unallocated). An allocation whose namespace is gone has nothing in either.
    pub(super) fn enforce(&mut self, id: PortId, record: Option<&Allocation>) -> Result<()> {
        let policy = record.and_then(Allocation::policy);
        if let Some(gate) = self.gate.as_mut() {
            match &policy {
                Some(policy) => gate.set_policy(id, policy)?,
                None => gate.remove_policy(id)?,
            }
        }
        self.security.set_policy(id, policy);
        Ok(())
    }

    /// Puts a port back to `record` in the allocator, the mirror and the kernel.
    fn put_back(&mut self, id: PortId, record: Option<Allocation>) {
        if let Err(err) = self.enforce(id, record.as_ref()) {
            log::error!(
                "undoing a change to {id} in the kernel failed: {}",
                Chain(&err)
            );
        }
        self.allocator.set(id, record);
    }
}

impl PortManager {
    /// Takes back an allocation just made, at once and without quarantine, when what had
    /// to come with it could not be done (nothing may have used it yet). A failure is
    /// logged: the allocation's own error is the answer.
    pub(super) async fn undo_allocation(&self, id: PortId) {
        let pending = {
            let mut state = self.state.lock().await;
            let before = state.allocator.remove(id);
            if before.is_none() {
                return;
            }
            self.apply(&mut state, vec![(id, before)])
        };
        let undone = match pending {
            Ok(pending) => {
                self.settle(pending, format!("undoing the allocation of {id}"))
                    .await
            }
            Err(err) => Err(err),
        };
        if let Err(err) = undone {
            log::error!("undoing the allocation of {id}: {}", Chain(&err));
        }
    }

    /// [`PortManager::apply_each`] for a change that stands or falls whole: the kernel's
    /// first refusal is the answer.
    pub(super) fn apply(&self, state: &mut State, before: Vec<Before>) -> Result<Pending> {
        let (pending, refused) = self.apply_each(state, before);
        match refused.into_iter().next() {
            Some((_, err)) => Err(err),
            None => Ok(pending),
        }
    }

    /// Writes each port in `before` as the allocator now holds it to the kernel and the
    /// mirror, and submits the ports that changed to the store. A port the kernel refuses
    /// is put back and returned with its error.
    /// Applies the steps one [`Ticked`] took in memory to the kernel and submits them to
    /// the store, port by port: a port the kernel refuses stays as the allocator has it and
    /// is logged (`what` names the steps), to be applied again by a later tick. Returns the
    /// steps taken for the other ports, and the submission.
    pub(super) fn apply_steps(
        &self,
        state: &mut State,
        ticked: Ticked,
        what: &str,
    ) -> (Vec<Transition>, Pending) {
        let before = ticked
            .before
            .into_iter()
            .map(|held| (held.id, Some(held)))
            .collect();
        let (pending, refused) = self.apply_each(state, before);
        for (id, err) in &refused {
            log::error!(
                "{what} of {id} not applied to the kernel, tried again later: {}",
                Chain(err)
            );
        }
        let steps = ticked
            .steps
            .into_iter()
            .filter(|step| !refused.iter().any(|(id, _)| *id == step.id()))
            .collect();
        (steps, pending)
    }

    pub(super) fn apply_each(
        &self,
        state: &mut State,
        before: Vec<Before>,
    ) -> (Pending, Vec<(PortId, PortError)>) {
        let mut changed = Vec::new();
        let mut refused = Vec::new();
        for (id, before) in before {
            let after = state.allocator.allocation(id).cloned();
            if after == before {
                continue;
            }
            match state.enforce(id, after.as_ref()) {
                Ok(()) => changed.push((id, before, after)),
                Err(err) => {
                    self.monitor.record_error(ErrorSource::Kernel);
                    state.put_back(id, before);
                    refused.push((id, err));
                }
            }
        }
        let commit = (!changed.is_empty()).then(|| {
            self.store.submit(
                changed
                    .iter()
                    .map(|(id, _, after)| after.clone().map_or(Change::Delete(*id), Change::Put))
                    .collect(),
            )
        });
        (Pending { commit, changed }, refused)
    }

    /// Waits until the store holds `pending`; `what` names the change in the error. When
    /// the store refuses it, each port still as the change left it is put back, and every
    /// later change is refused until the daemon restarts.
    pub(super) async fn settle(&self, pending: Pending, what: String) -> Result<()> {
        let Some(commit) = pending.commit else {
            return Ok(());
        };
        let Err(err) = commit.wait().await else {
            return Ok(());
        };
        self.monitor.record_error(ErrorSource::Store);
        // First, so that no change queued behind this one is taken meanwhile.
        self.store_failed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut state = self.state.lock().await;
        for (id, before, after) in pending.changed.into_iter().rev() {
            if state.allocator.allocation(id) == after.as_ref() {
                state.put_back(id, before);
            }
        }
        Err(PortError::state(
            format!("{what} was not saved and was undone. {STORE_ADVICE}"),
            Some(Box::new(err)),
        ))
    }
}
