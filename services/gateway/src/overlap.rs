//! Which prompts may go to the router while the guard checks them (ADR 011).
//!
//! The guard says, with every prompt check, whether the policy of that app and route can block
//! or change any prompt (`CheckPromptResponse.prompt_passthrough`). When it cannot (every entity
//! allowed, injection and topics off or only flagged), the check decides nothing about what the
//! provider receives; it reports findings and may still fail (guard down, fail-closed route). The
//! gateway remembers such (app, route) pairs together with the generation of its connection to the
//! guard, and for them starts the router call at the same time as the check, holding the answer
//! (or a stream's first chunk) until the check is in. A new connection to the guard (it
//! restarted, perhaps with another policy) forgets everything: the next prompts are checked first
//! again until the guard says otherwise.

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use switchboard_grpc::H2Channel;

/// (app, route) pairs remembered at most; past it the memory starts again (route names come from
/// callers, so the set must be bounded).
const MAX_ENTRIES: usize = 4096;

type Learned = HashMap<String, HashMap<String, u64>>;

/// The pass-through policies the guard reported, by app and route.
#[derive(Debug, Default)]
pub struct Passthrough {
    /// The guard's transport (its connection generation); `None`: never overlap.
    transport: Option<H2Channel>,
    /// app → route → generation of the guard connection that said "pass-through".
    learned: RwLock<Learned>,
    overlapped: AtomicU64,
}

impl Passthrough {
    /// Overlapping on (`transport` is the guard channel's), or off (`None`).
    pub fn new(transport: Option<H2Channel>) -> Self {
        Self {
            transport,
            ..Self::default()
        }
    }

    /// Whether a prompt of `app` for `route` may be sent before its check is in.
    pub fn may_overlap(&self, app: &str, route: &str) -> bool {
        let Some(current) = self.transport.as_ref().and_then(H2Channel::generation) else {
            return false;
        };
        let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
        learned
            .get(app)
            .and_then(|routes| routes.get(route))
            .is_some_and(|generation| *generation == current)
    }

    /// Remembers what a check said about the policy of `app` and `route`.
    pub fn learn(&self, app: &str, route: &str, passthrough: bool) {
        let Some(current) = self.transport.as_ref().and_then(H2Channel::generation) else {
            return;
        };
        let known = {
            let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
            learned
                .get(app)
                .and_then(|routes| routes.get(route))
                .copied()
        };
        match (passthrough, known) {
            (true, Some(generation)) if generation == current => {}
            (true, _) => {
                let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
                if learned.values().map(HashMap::len).sum::<usize>() >= MAX_ENTRIES {
                    learned.clear();
                }
                learned
                    .entry(app.to_owned())
                    .or_default()
                    .insert(route.to_owned(), current);
            }
            (false, Some(_)) => {
                let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
                if let Some(routes) = learned.get_mut(app) {
                    routes.remove(route);
                }
            }
            (false, None) => {}
        }
    }

    /// Counts a request whose router call started before its check was in.
    pub fn overlapped(&self) {
        self.overlapped.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests whose router call started before their check was in.
    pub fn overlapped_total(&self) -> u64 {
        self.overlapped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nothing_overlaps_without_a_connection_or_when_off() {
        let off = Passthrough::new(None);
        off.learn("a", "m", true);
        assert!(!off.may_overlap("a", "m"));
        // A channel that never connected has no generation: nothing is learnt.
        let idle = Passthrough::new(Some(H2Channel::new("http://127.0.0.1:9").unwrap()));
        idle.learn("a", "m", true);
        assert!(!idle.may_overlap("a", "m"));
        assert!(idle.learned.read().unwrap().is_empty());
    }
}
