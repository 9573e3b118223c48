//! Routes: which ops (collection and action) or repo events a handler receives.

use atrium_api::types::Collection;

use crate::Action;

/// Which ops a handler wants: one collection NSID and a set of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The collection NSID, e.g. `agent.comms.task`.
    pub collection: &'static str,
    /// The actions handled.
    pub actions: &'static [Action],
}

impl Route {
    /// Creates and updates of `C` (what a [`Record<C>`](crate::Record) argument selects).
    pub const fn records<C: Collection>() -> Route {
        Route {
            collection: C::NSID,
            actions: &[Action::Create, Action::Update],
        }
    }

    /// Ops on `C` with one action (what `Created<C>`, `Updated<C>` and `Deleted<C>` select).
    pub const fn action<C: Collection>(action: Action) -> Route {
        Route {
            collection: C::NSID,
            actions: match action {
                Action::Create => &[Action::Create],
                Action::Update => &[Action::Update],
                Action::Delete => &[Action::Delete],
            },
        }
    }

    /// `#identity` or `#account` events (what [`Identity`](crate::Identity) and
    /// [`AccountStatus`](crate::AccountStatus) select).
    pub const fn repo_events(kind: &'static str) -> Route {
        Route {
            collection: kind,
            actions: &[Action::Update],
        }
    }

    /// Whether an op on `collection` with `action` goes to this route.
    pub fn matches(&self, collection: &str, action: Action) -> bool {
        self.collection == collection && self.actions.contains(&action)
    }
}
