//! A value that travels on the wire but must never appear in logs.
use serde::{Deserialize, Serialize};
use std::fmt;

/// Wraps a secret (a TOTP code, a one-time SPICE password). It serializes transparently, but its
/// `Debug` and `Display` print `[redacted]`, so a `?request` in a tracing macro cannot leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Redacted<T>(T);

impl<T> Redacted<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The secret itself. Call sites are easy to audit with `grep expose`.
    pub fn expose(&self) -> &T {
        &self.0
    }
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<&str> for Redacted<String> {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value_but_json_carries_it() {
        let s = Redacted::new("123456".to_string());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"123456\"");
        let back: Redacted<String> = serde_json::from_str("\"654321\"").unwrap();
        assert_eq!(back.expose(), "654321");
    }
}
