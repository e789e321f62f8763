//! The slot through which a long-lived handle reaches the actor running for it now.
//!
//! Owns: one `Option<ActorRef>` behind a lock, filled by the actor when it starts and
//! emptied when it stops, so handles (registry, assignments, pools, listeners) outlive
//! restarts of their actors. Must not touch: what the actor does or when it restarts.

use parking_lot::RwLock;
use ractor::{ActorRef, Message};

/// The actor behind a handle, if one runs now.
pub struct ActorSlot<M: Message>(RwLock<Option<ActorRef<M>>>);

impl<M: Message> Default for ActorSlot<M> {
    fn default() -> Self {
        ActorSlot(RwLock::new(None))
    }
}

impl<M: Message> ActorSlot<M> {
    /// The running actor, if any.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().clone()
    }

    /// Whether no actor runs now.
    pub fn is_empty(&self) -> bool {
        self.0.read().is_none()
    }

    /// A (new) actor runs now.
    pub fn set(&self, actor: ActorRef<M>) {
        *self.0.write() = Some(actor);
    }

    /// Empties the slot and returns what it held (to stop it).
    pub fn take(&self) -> Option<ActorRef<M>> {
        self.0.write().take()
    }

    /// Empties the slot if it still holds `actor`: a stopping actor must not clear the
    /// slot of a successor that already started.
    pub fn clear_if(&self, actor: &ActorRef<M>) {
        let mut slot = self.0.write();
        if slot.as_ref().is_some_and(|a| a.get_id() == actor.get_id()) {
            *slot = None;
        }
    }
}
