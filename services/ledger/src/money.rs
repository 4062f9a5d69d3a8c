//! Money without floats: moved to `libs/pricing` (shared with the gateway's budget estimates and
//! settlement and the router's per-attempt budget check, ADR 007); re-exported here.

pub use switchboard_pricing::*;
