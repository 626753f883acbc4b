//! The embedded store: a redb database.
