//! Reversible pseudonyms: the mapping and the restore live in `switchboard-pseudonym` (shared with
//! the gateway, which restores answers); re-exported here.

pub use switchboard_pseudonym::{Mapping, Restorer, restore};
