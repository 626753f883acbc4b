//! How an error reads to a person: its message, then each cause's, on one line.
//!
//! Errors say their own part only and keep their cause as a `#[source]`; the edges (the
//! CLI's failure line, the API's error message, the daemon's log) print the chain with
//! this, so that no cause is lost and none is said twice.

use std::{error::Error, fmt};

/// `err` and its causes, joined with `": "`.
#[must_use]
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    Chain(err).to_string()
}

/// Displays an error and its causes, joined with `": "`.
#[derive(Clone, Copy, Debug)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("reading counters")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_says_each_cause_once() {
        let err = Outer(std::io::Error::other("map gone"));
        assert_eq!(error_chain(&err), "reading counters: map gone");
    }
}
