//! An in-memory store (tests, and managers that need no durability).
